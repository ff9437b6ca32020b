"""Structured output that never comes back broken: JSON mode and tool calls are enforced by the grammar while
decoding (enum, const, anyOf/oneOf, $ref, nested objects and arrays with item bounds, string lengths, patterns
and formats, numeric bounds) and always completed within the token budget, from a tight budget to a generous
one, hot sampling included; a budget too small for any valid answer is refused before anything is generated."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import MODEL, metric, run_url
from jsonschema import Draft202012Validator
from test_contract import assert_error, assert_ok

from workers_ai_local.json_values import parse_model_json

EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "description": "A short title", "minLength": 3, "maxLength": 40},
        "kind": {"type": "string", "description": "What it is", "enum": ["meeting", "party", "talk"]},
        "when": {"type": "string", "description": "Start", "format": "date-time"},
        "attendees": {
            "type": "array",
            "description": "Who comes",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                "required": ["name", "email"],
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "priority": {"type": "integer", "description": "1 to 5", "minimum": 1, "maximum": 5},
        "score": {"type": "number", "description": "Above 0, at most 1", "exclusiveMinimum": 0, "maximum": 1},
    },
    "required": ["title", "kind", "when", "attendees", "priority", "score"],
}
SHAPE = {
    "$defs": {"tag": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
    "type": "object",
    "properties": {
        "version": {"type": "string", "description": "Always v1", "const": "v1"},
        "shape": {
            "type": "object",
            "description": "A circle or a rectangle",
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0.5}},
                    "required": ["kind", "radius"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "rectangle"},
                        "width": {"type": "integer", "minimum": 1},
                        "height": {"type": "integer", "minimum": 1},
                    },
                    "required": ["kind", "width", "height"],
                    "additionalProperties": False,
                },
            ],
        },
        "tags": {"type": "array", "description": "Labels", "items": {"$ref": "#/$defs/tag"}, "maxItems": 4},
        "day": {"type": "string", "description": "A date", "format": "date"},
        "id": {"type": "string", "description": "Identifier", "format": "uuid"},
        "note": {
            "type": "object",
            "description": "A remark, or none",
            "properties": {"text": {"anyOf": [{"type": "string", "maxLength": 60}, {"type": "null"}]}},
            "required": ["text"],
        },
    },
    "required": ["version", "shape", "tags", "id", "note"],
}
COUNTRY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "The country"},
        "code": {"type": "string", "description": "ISO 3166 alpha-2", "pattern": "^[A-Z]{2}$"},
        "capital": {"type": "string", "description": "The capital"},
        "languages": {
            "type": "array",
            "description": "Spoken languages",
            "items": {"type": "string"},
            "minItems": 1,
            "maxItems": 5,
        },
        "population": {"type": "integer", "description": "People", "minimum": 1},
    },
    "required": ["name", "code", "capital", "languages", "population"],
}
SCHEMAS = {"event": EVENT, "shape": SHAPE, "country": COUNTRY}
ASK = {
    "event": "Plan a team event and describe it.",
    "shape": "Describe a shape with a few tags.",
    "country": "Tell me about a country.",
}
# From exactly the shortest answer's budget up to generous ones.
EXTRA_BUDGET = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55]


def valid(schema: dict[str, Any], value: Any) -> None:
    Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(value)


def shortest(url: str, body: dict[str, Any], path: str | None = None) -> int:
    """The budget the server says the shortest valid answer needs (from its refusal of max_tokens 1)."""
    response = httpx.post(url + (path or run_url()), json={**body, "max_tokens": 1}, timeout=60)
    assert response.status_code == 400, response.text
    text = json.dumps(response.json())
    found = re.search(r"raise max_tokens to at least (\d+)", text)
    assert found, text
    return int(found.group(1))


def json_mode(url: str, name: str, seed: int, budget: int) -> None:
    fmt = {"type": "json_schema", "json_schema": SCHEMAS[name]}
    body = {"prompt": ASK[name], "response_format": fmt, "temperature": 1.0, "seed": seed, "max_tokens": budget}
    if seed % 2:
        valid(SCHEMAS[name], assert_ok(httpx.post(url + run_url(), json=body, timeout=120))["response"])
        return
    oai = {
        "model": MODEL,
        "messages": [{"role": "user", "content": ASK[name]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}},
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": budget,
    }
    reply = httpx.post(url + "/v1/chat/completions", json=oai, timeout=120)
    assert reply.status_code == 200, reply.text
    valid(SCHEMAS[name], json.loads(reply.json()["choices"][0]["message"]["content"]))


def tool(name: str) -> dict[str, Any]:
    return {"name": f"record_{name}", "description": f"Record a {name}", "parameters": SCHEMAS[name]}


def tool_call(url: str, name: str, seed: int, budget: int, stream: bool) -> None:
    body = {
        "messages": [{"role": "user", "content": ASK[name]}],
        "tools": [tool(name)],
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": budget,
    }
    if seed % 2:
        if not stream:
            calls = assert_ok(httpx.post(url + run_url(), json=body, timeout=120))["tool_calls"]
        else:
            with httpx.stream("POST", url + run_url(), json={**body, "stream": True}, timeout=120) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            calls = [call for event in events for call in event.get("tool_calls", [])]
    else:
        oai = {**body, "model": MODEL, "tools": [{"type": "function", "function": tool(name)}], "stream": stream}
        if not stream:
            reply = httpx.post(url + "/v1/chat/completions", json=oai, timeout=120).json()
            raw = reply["choices"][0]["message"]["tool_calls"]
        else:
            with httpx.stream("POST", url + "/v1/chat/completions", json=oai, timeout=120) as response:
                chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            raw = [tc for c in chunks for choice in c["choices"] for tc in choice["delta"].get("tool_calls") or []]
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in raw]
    assert [c["name"] for c in calls] == [f"record_{name}"], calls
    valid(SCHEMAS[name], calls[0]["arguments"])


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_validates_from_tight_budgets_to_generous_ones(server, name):
    """Seeds 1..50 at temperature 1.0: JSON mode, a tool call, or a streamed tool call by turns, through /ai/run
    (odd seeds) and the OpenAI routes (even seeds), each with a budget from the shortest answer's up."""
    fmt = {"type": "json_schema", "json_schema": SCHEMAS[name]}
    needed = {
        "json": shortest(server.url, {"prompt": ASK[name], "response_format": fmt}),
        "tool": shortest(server.url, {"messages": [{"role": "user", "content": ASK[name]}], "tools": [tool(name)]}),
    }
    jobs = []
    for seed in range(1, 51):
        kind = ("json", "tool", "stream")[seed % 3]
        budget = needed["json" if kind == "json" else "tool"] + EXTRA_BUDGET[seed % len(EXTRA_BUDGET)]
        if kind == "json":
            jobs.append(lambda s=seed, b=budget: json_mode(server.url, name, s, b))
        else:
            jobs.append(lambda s=seed, b=budget, k=kind: tool_call(server.url, name, s, b, stream=k == "stream"))
    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(job) for job in jobs]:
            done.result()


def test_the_country_example_succeeds(server):
    # As a new user writes it: no seed, the default temperature, max_tokens 200.
    fmt = {
        "type": "json_schema",
        "json_schema": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "capital": {"type": "string"},
                "languages": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "capital", "languages"],
        },
    }
    messages = [
        {"role": "system", "content": "Extract data about a country."},
        {"role": "user", "content": "Tell me about India."},
    ]

    def ask(seed: int) -> dict[str, Any]:
        body = {"messages": messages, "response_format": fmt, "max_tokens": 200, "seed": seed}
        return assert_ok(httpx.post(server.url + run_url(), json=body, timeout=120))["response"]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(1, 21)))
    for answer in answers:
        valid(fmt["json_schema"], answer)
    assert sum(answer["name"] == "India" for answer in answers) >= 15


def test_a_budget_too_small_for_any_answer_is_refused_before_generation(client):
    fmt = {"type": "json_schema", "json_schema": EVENT}
    needed = shortest(client.base_url.__str__().rstrip("/"), {"prompt": "An event.", "response_format": fmt})
    before = metric(client.get("/metrics").text, "workers_ai_completion_tokens_total")
    response = client.post(run_url(), json={"prompt": "An event.", "response_format": fmt, "max_tokens": needed - 1})
    assert_error(response, 400, 5006, f"max_tokens {needed - 1} cannot hold", f"at least {needed}")
    assert metric(client.get("/metrics").text, "workers_ai_completion_tokens_total") == before
    # Seeded: the model may find a valid answer in fewer tokens than the shortest ending's own tokenization.
    body = {"prompt": "An event.", "response_format": fmt, "max_tokens": needed, "seed": 1}
    exact = assert_ok(client.post(run_url(), json=body))
    valid(EVENT, exact["response"])
    assert 0 < exact["usage"]["completion_tokens"] <= needed


def test_forced_calls_need_room_too(client):
    body = {"messages": [{"role": "user", "content": "Plan an event."}], "tools": [tool("event")], "max_tokens": 3}
    # SmolLM2's template knows no tools, so a user turn is answered with a call: one that cannot fit is refused.
    assert_error(client.post(run_url(), json=body), 400, 5006, "max_tokens 3 cannot hold", "at least")


def test_unsupported_keywords_are_named(client):
    for schema, keyword in (
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "not": {"required": ["a"]}}, "not"),
    ):
        fmt = {"type": "json_schema", "json_schema": schema}
        response = client.post(run_url(), json={"prompt": "x", "response_format": fmt})
        assert_error(response, 400, 5006, "'/response_format/json_schema' cannot be enforced", keyword)
    tools = [{"name": "t", "description": "d", "parameters": {"type": "object", "properties": {}, "uniqueItems": True}}]
    response = client.post(run_url(), json={"messages": [{"role": "user", "content": "x"}], "tools": tools})
    assert_error(response, 400, 5006, "a tool's parameters cannot be enforced", "uniqueItems")


def test_json_mode_refuses_stream_tools_and_bad_schemas(client):
    fmt = {"type": "json_object"}
    response = client.post(run_url(), json={"prompt": "x", "response_format": fmt, "stream": True})
    assert_error(response, 400, 5006, "streaming")
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [tool("country")], "response_format": fmt}
    assert_error(client.post(run_url(), json=body), 400, 5006, "cannot be combined")
    for bad in ({"type": 12}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}):
        response = client.post(
            run_url(), json={"prompt": "x", "response_format": {"type": "json_schema", "json_schema": bad}}
        )
        assert_error(response, 400, 5006, "response_format")
    assert_error(
        client.post(run_url(), json={"prompt": "x", "response_format": {"type": "yaml"}}), 400, 5006, "json_object"
    )
    assert assert_ok(client.post(run_url(), json={"prompt": "Still there?", "max_tokens": 3}))


def test_json_object_mode_gives_an_object(client):
    body = {"prompt": "A JSON object please.", "response_format": {"type": "json_object"}, "temperature": 0}
    assert isinstance(assert_ok(client.post(run_url(), json=body))["response"], dict)


def test_the_model_is_shown_the_schema_unless_the_request_speaks_of_json(client):
    fmt = {"type": "json_schema", "json_schema": COUNTRY}
    shown = assert_ok(client.post(f"/ai/tokenize/{MODEL}", json={"prompt": "India?", "response_format": fmt}))
    assert "validates against this JSON Schema" in shown["prompt"] and '"pattern": "^[A-Z]{2}$"' in shown["prompt"]
    own = {"messages": [{"role": "user", "content": "India, as JSON with name, code and capital."}]}
    described = assert_ok(client.post(f"/ai/tokenize/{MODEL}", json={**own, "response_format": fmt}))
    assert "JSON Schema" not in described["prompt"]


def test_a_number_beyond_a_double_reads_as_javascript_reads_it():
    # JSON's grammar lets a constrained answer hold 1e999; the service's JSON.parse makes it Infinity, which its
    # JSON.stringify writes as null. Python would make it inf, which no JSON answer can carry (it was a 500).
    assert parse_model_json('{"a": 1e999, "b": [-1E400, 2.5], "c": 7}') == {"a": None, "b": [None, 2.5], "c": 7}
