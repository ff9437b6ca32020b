"""The OpenAI-compatible routes with the official `openai` SDK, the catalog routes, API tokens and OpenAPI."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import GUARD_TOKEN, MODEL, ServerProcess, run_url
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from test_contract import assert_error, assert_ok

from workers_ai_local.contract import documented

WEATHER = {
    "type": "function",
    "function": {
        "name": "getWeather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module", params=["/client/v4/accounts/acc/ai/v1", "/v1"])
def oai(server, request):
    with openai.OpenAI(api_key="unused", base_url=server.url + request.param, max_retries=0) as client:
        yield client


def test_chat_completion(oai):
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0, seed=3
    )
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # The same conversation through Workers AI's own route gives the same text.
    again = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0, seed=3
    )
    assert again.choices[0].message.content == choice.message.content


def test_streaming_chat_equals_whole(oai):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, temperature=0)
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_with_stop(oai):
    reply = oai.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[" 7"])
    assert reply.object == "text_completion"
    assert reply.choices[0].text.startswith(" 4, 5, 6,") and " 7" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=" 7", stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_tools_and_tool_choice(oai):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    reply = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=64, temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.type == "function" and call.function.name == "getWeather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 3}'},
    ]
    answer = oai.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=32, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

    forced = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0
    )
    assert forced.choices[0].message.tool_calls[0].function.name == "getWeather"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model=MODEL,
            messages=messages[:1],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nowhere"}},
        )
    named = oai.chat.completions.create(
        model=MODEL,
        messages=messages[:1],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "getWeather"}},
        max_tokens=64,
        temperature=0,
    )
    assert named.choices[0].message.tool_calls[0].function.name == "getWeather"
    none = oai.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0
    )
    assert not none.choices[0].message.tool_calls

    stream = oai.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER], max_tokens=64, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed_calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert streamed_calls[0].function.name == "getWeather"


def test_json_mode(oai):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    reply = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=80,
        temperature=0,
    )
    Draft202012Validator(schema).validate(json.loads(reply.choices[0].message.content))
    plain = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A JSON object."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_models_and_errors(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="@cf/none/none", messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert "temperature" in bad.value.body["message"] and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)


def test_catalog_search_and_schema(client):
    found = client.get("/client/v4/accounts/acc/ai/models/search", params={"search": "llama-3.1"}).json()
    assert found["success"] is True and found["result_info"]["total_count"] == 1
    entry = found["result"][0]
    assert entry["name"] == MODEL and entry["task"]["name"] == "Text Generation" and entry["description"]
    assert client.get("/client/v4/accounts/acc/ai/models/search", params={"search": "whisper"}).json()["result"] == []
    schema = assert_ok(client.get("/client/v4/accounts/acc/ai/models/schema", params={"model": MODEL}))
    assert schema["input"]["oneOf"][0]["title"] == "Prompt" and "oneOf" in schema["output"]
    assert_error(client.get("/client/v4/accounts/acc/ai/models/schema", params={"model": "@cf/x/y"}), 400, 5007)
    assert_error(client.get("/client/v4/accounts/acc/ai/models/schema"), 400, 5006, "model")


def test_openapi_document_is_valid_and_uses_the_served_schemas(client):
    document = client.get("/openapi.json").json()
    validate_openapi(document)
    served = assert_ok(client.get("/client/v4/accounts/acc/ai/models/schema", params={"model": MODEL}))["input"]
    # The published schema, with what the server adds to it (server/contract.py), stated once for both.
    assert document["components"]["schemas"]["RunInput"] == documented(served)
    assert document["components"]["schemas"]["RunInput"]["oneOf"][1]["properties"]["messages"]["minItems"] == 1
    for path in ("/client/v4/accounts/{account_id}/ai/run/{model}", "/v1/chat/completions", "/health"):
        assert path in document["paths"]


def test_tokens_guard_every_api_route_and_leave_the_open_ones_open(guarded):
    # What every run surface does with tokens is in test_matrix; here: the token file, the other API routes,
    # the routes that stay open, and the OpenAI SDK's view of a refusal.
    url = guarded.url
    assert_ok(
        httpx.post(
            url + run_url(), json={"prompt": "Hi", "max_tokens": 1}, headers={"authorization": "Bearer file-token"}
        )
    )
    for path in ("/metrics", "/client/v4/accounts/a/ai/models/search", "/client/v4/accounts/a/ai/finetunes"):
        response = httpx.get(url + path)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/", "/openapi.json"):
        assert httpx.get(url + path).status_code == 200
    with openai.OpenAI(api_key=GUARD_TOKEN, base_url=url + "/v1", max_retries=0) as oai:
        assert oai.models.list().data[0].id == MODEL
    with (
        openai.OpenAI(api_key="bad", base_url=url + "/v1", max_retries=0) as oai,
        pytest.raises(openai.PermissionDeniedError),
    ):
        oai.models.list()


def test_non_loopback_without_token_warns(tmp_path):
    # An unknown --model makes it exit before binding anything: only the warning is under test.
    proc = ServerProcess(tmp_path / "open.log", "--host", "0.0.0.0", "--model", "no-such-model")
    assert proc.process.wait(timeout=30) == 2
    proc.stop()
    assert "no API token" in proc.log()


def test_function_without_parameters(oai):
    tool = {"type": "function", "function": {"name": "ping", "description": "Ping the service"}}
    reply = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Ping it."}], tools=[tool], max_tokens=32, temperature=0
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}
