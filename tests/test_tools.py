"""Tool calling and JSON mode over HTTP, with the official SDK for the agent loop."""

from __future__ import annotations

import json

from cloudflare import Cloudflare
from conftest import MODEL, run_url
from jsonschema import Draft202012Validator
from test_contract import assert_error, assert_ok

WEATHER = {
    "name": "getWeather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "The city name"},
            "unit": {"type": "string", "description": "celsius or fahrenheit"},
        },
        "required": ["city"],
    },
}
BOOKING = {
    "type": "function",
    "function": {
        "name": "bookTable",
        "description": "Book a restaurant table",
        "parameters": {
            "type": "object",
            "properties": {
                "restaurant": {"type": "string", "description": "Restaurant name"},
                "guests": {"type": "integer", "description": "How many people"},
                "outdoor": {"type": "boolean", "description": "Sit outside"},
                "budget": {"type": "number", "description": "Budget in euros"},
            },
            "required": ["restaurant", "guests", "outdoor"],
        },
    },
}
SCHEMAS = {"getWeather": WEATHER["parameters"], "bookTable": BOOKING["function"]["parameters"]}


def assert_valid_calls(calls: list[dict]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call["name"] in SCHEMAS
        assert isinstance(call["arguments"], dict)
        Draft202012Validator(SCHEMAS[call["name"]]).validate(call["arguments"])


def test_agent_loop_with_the_sdk(server):
    cf = Cloudflare(api_token="local", base_url=f"{server.url}/client/v4", max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = cf.ai.run(MODEL, account_id="acc", messages=messages, tools=[WEATHER], max_tokens=64, temperature=0)
    assert_valid_calls(first["tool_calls"])
    call = first["tool_calls"][0]
    assert call["name"] == "getWeather"
    messages += [
        {"role": "assistant", "content": "", "tool_calls": first["tool_calls"]},
        {"role": "tool", "name": "getWeather", "content": json.dumps({"temperature_c": 18, "sky": "cloudy"})},
    ]
    second = cf.ai.run(MODEL, account_id="acc", messages=messages, tools=[WEATHER], max_tokens=48, temperature=0)
    assert not second.get("tool_calls")
    assert second["response"].strip()


def test_both_tool_shapes_and_two_tools_give_valid_calls(client):
    # Fifty seeds of single tools in every mode are in test_structured_output; here, two tools of both shapes.
    for seed in range(1, 11):
        body = {
            "messages": [
                {"role": "user", "content": "Book a table for four at Chez Lui, outside, or tell me the weather."}
            ],
            "tools": [WEATHER, BOOKING],
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 96,
        }
        result = assert_ok(client.post(run_url(), json=body))
        assert_valid_calls(result["tool_calls"])


def test_tool_call_streams_as_one_event_before_usage(client):
    body = {
        "messages": [{"role": "user", "content": "Weather in Rome?"}],
        "tools": [WEATHER],
        "temperature": 0,
        "max_tokens": 64,
        "stream": True,
    }
    with client.stream("POST", run_url(), json=body) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    events = [json.loads(f) for f in frames[:-1]]
    assert "usage" in events[-1]
    calls = [e for e in events if e.get("tool_calls")]
    assert len(calls) == 1 and events.index(calls[0]) == len(events) - 2
    assert_valid_calls(calls[0]["tool_calls"])
    assert not any("{" in e.get("response", "") for e in events)
    whole = assert_ok(client.post(run_url(), json={**body, "stream": False}))
    assert whole["tool_calls"] == calls[0]["tool_calls"]


def test_functions_are_accepted(client):
    body = {
        "messages": [{"role": "user", "content": "Say hi."}],
        "functions": [{"name": "helper", "code": "export default () => 1"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    with_functions = assert_ok(client.post(run_url(), json=body))
    without = assert_ok(client.post(run_url(), json={k: v for k, v in body.items() if k != "functions"}))
    assert with_functions["response"] == without["response"]


def test_malformed_tool_history_is_a_400_not_a_500(client):
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "getWeather", "arguments": "{oops"}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    body = {"messages": messages, "tools": [WEATHER], "max_tokens": 8}
    assert_error(client.post(run_url(), json=body), 400, 5006, "tool call")
    body["messages"][1]["tool_calls"] = [{"arguments": {}}]
    assert_error(client.post(run_url(), json=body), 400, 5006, "tool call")


# What langchain-cloudflare's bind_tools sends for `@tool def get_weather(city: str)`: convert_to_openai_tool's
# shape, a parameter with no description, plus the $schema and additionalProperties it adds. Its live tests bind
# this tool on the platform (models of this same tools schema) and expect an answer, not an error.
BOUND_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "$schema": "http://json-schema.org/draft-07/schema#",
            "additionalProperties": False,
        },
    },
}


def test_a_parameter_without_a_description_is_taken_as_the_platform_takes_it(client):
    messages = [{"role": "user", "content": "What's the weather in San Francisco?"}]
    body = {"messages": messages, "tools": [BOUND_WEATHER], "max_tokens": 48, "temperature": 0}
    result = assert_ok(client.post(run_url(), json=body))
    (call,) = result["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    flat = {**BOUND_WEATHER["function"]}
    assert assert_ok(client.post(run_url(), json={**body, "tools": [flat]}))["tool_calls"]
    openai = {"model": MODEL, "messages": messages, "tools": [BOUND_WEATHER], "max_tokens": 48, "temperature": 0}
    choice = client.post("/v1/chat/completions", json=openai).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    # A parameter still needs its type.
    untyped = {**flat, "parameters": {"type": "object", "properties": {"city": {"description": "The city"}}}}
    assert_error(client.post(run_url(), json={**body, "tools": [untyped]}), 400, 5006)
