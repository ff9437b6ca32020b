"""What a parsed request may cost, and the 500s its content used to cause: every request here is refused (or
answered) at once, in the called route's error shape, against the shared servers of conftest.py.

Timeouts are bounds, not measurements: each of these requests used to take from several seconds to forever."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import GUARD_TOKEN, MODEL, run_url

# Far above what any of these requests takes once refused up front, far below what they took before.
BOUND_S = 10


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    return client.post(path, content=content, headers=headers, timeout=BOUND_S)


def error_message(response: httpx.Response) -> str:
    payload = response.json()
    if "error" in payload:  # OpenAI's shape
        return payload["error"]["message"]
    assert payload["success"] is False, payload
    return payload["errors"][0]["message"]


def json_mode(schema: dict[str, Any], max_tokens: int = 64) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "json"}],
        "max_tokens": max_tokens,
        "response_format": {"type": "json_schema", "json_schema": schema},
    }


def with_tool(parameters: Any, max_tokens: int = 32) -> dict[str, Any]:
    tool = {"name": "f", "description": "d", "parameters": parameters}
    return {"messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens, "tools": [tool]}


def array_of(**bounds: Any) -> dict[str, Any]:
    array = {"type": "array", "description": "a list", **bounds}
    return {"type": "object", "properties": {"a": array}, "required": ["a"]}


COSTLY = {
    # Tied a thread forever, growing ~1.4 MB/s; could not be stopped, and held SIGTERM.
    "minItems 2^63": (json_mode(array_of(minItems=2**63)), ["'minItems'", "1024"]),
    # Six seconds and more of CPU before a 400.
    "minItems 1e6": (json_mode(array_of(minItems=1_000_000)), ["'minItems'", "1024"]),
    "tool minItems 1e6": (with_tool(array_of(minItems=1_000_000)), ["'/tools/0/parameters'", "'minItems'"]),
    # Each bound within its limit, but 1,000 x 1,000 items together (2 GB and a minute before).
    "nested minItems": (
        json_mode(array_of(minItems=1000, items={"type": "array", "minItems": 1000, "items": {"type": "integer"}})),
        ["shortest answer is longer than 1048576 bytes"],
    ),
    "enum of 5000": (
        json_mode({"type": "object", "properties": {"a": {"enum": list(range(5000))}}, "required": ["a"]}),
        ["'enum'", "1000"],
    ),
}


@pytest.mark.parametrize("case", list(COSTLY))
def test_schema_costs_are_refused_naming_keyword_and_limit(client, case):
    body, words = COSTLY[case]
    response = post(client, run_url(), body)
    assert response.status_code == 400, response.text
    message = error_message(response)
    assert all(word in message for word in words), message


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def defs(definitions: dict[str, Any], ref: str) -> dict[str, Any]:
    return {"$defs": definitions, "type": "object", "properties": {"x": {"$ref": ref}}, "required": ["x"]}


# Followed: max_tokens 1 cannot hold the shortest answer, so the 400 says the resolver found it (a 500 before).
RESOLVED = {
    "list index": {
        "type": "object",
        "properties": {"a": {"anyOf": [{"type": "integer"}]}, "b": {"$ref": "#/properties/a/anyOf/0"}},
        "required": ["b"],
    },
    "percent escape": defs({"a b": {"type": "integer"}}, "#/$defs/a%20b"),
    "boolean schema": defs({"t": True}, "#/$defs/t"),
}
# Refused: forms the shortest-answer resolver does not follow, and a cycle no answer leaves (a 500 before).
REFUSED = {
    "anchor": (defs({"a": {"$anchor": "foo", "type": "integer"}}, "#foo"), "JSON Pointer"),
    "self anyOf": (defs({"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "#/$defs/a"), "itself"),
    "nested 40": (nested(40), "deeper than 32"),
    # The issue's 100 levels nest the body past its own depth limit (docs/hardening.md), refused before parsing.
    "nested 100": (nested(100), "the limit is 128"),
}


@pytest.mark.parametrize("case", list(RESOLVED))
def test_refs_are_followed(client, case):
    response = post(client, run_url(), json_mode(RESOLVED[case], max_tokens=1))
    assert response.status_code == 400, response.text
    assert "cannot hold a complete answer" in error_message(response)


@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("route", [run_url(), "/v1/chat/completions"])
def test_unfollowable_schemas_are_refused(client, case, route):
    schema, words = REFUSED[case]
    body = json_mode(schema)
    if route.startswith("/v1/"):
        body = {
            **body,
            "model": MODEL,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
    response = post(client, route, body)
    assert response.status_code == 400, response.text
    assert words in error_message(response)


def test_tool_parameters_are_a_schema(client):
    response = post(client, run_url(), with_tool({"type": "object", "$defs": "str", "properties": {}}))
    assert response.status_code == 400, response.text
    assert "'/tools/0/parameters' is not a JSON Schema" in error_message(response)


def test_tool_refs_must_name_their_own_definitions(client):
    b = {"type": "integer", "description": "b"}
    parameters = {
        "type": "object",
        "properties": {"a": {"$ref": "#/properties/b", "type": "integer", "description": "a"}, "b": b},
    }
    response = post(client, run_url(), with_tool(parameters))
    assert response.status_code == 400, response.text
    assert "'#/$defs/NAME'" in error_message(response)


def test_a_lora_name_longer_than_a_file_name(client):
    response = post(client, run_url(), {"prompt": "x", "max_tokens": 1, "lora": "a" * 300})
    assert response.status_code == 404, response.text
    assert response.json()["errors"][0]["code"] == 3042


def test_an_empty_completion_prompt_is_answered(client):
    body = {"model": MODEL, "prompt": [""], "max_tokens": 1}
    response = client.post("/v1/completions", json=body, timeout=120)  # a real generation
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 1  # generation starts from the model's BOS token
    # The metrics counted it (a negative cached-token count made the counter raise, losing the log line).
    assert 'workers_ai_requests_total{status="200"}' in client.get("/metrics").text


NON_FINITE = [("temperature", "NaN"), ("top_p", "NaN"), ("repetition_penalty", "NaN"), ("presence_penalty", "NaN")]


@pytest.mark.parametrize(("field", "literal"), NON_FINITE)
@pytest.mark.parametrize("route", [run_url(), "/v1/chat/completions"])
def test_non_finite_sampling_is_refused(client, field, literal, route):
    body = '{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "' + field + '": ' + literal
    body += f', "model": "{MODEL}"}}' if route.startswith("/v1/") else "}"
    response = post(client, route, body)
    assert response.status_code == 400, response.text
    assert f"'/{field}' must be a finite number" in error_message(response)
    if route.startswith("/v1/"):
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_too_many_messages_are_refused_before_rendering(client):
    messages = [{"role": "user", "content": "hi"}] * 2049
    response = post(client, run_url(), {"messages": messages, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert "2049 messages, over the limit of 2048" in error_message(response)


def test_too_many_characters_are_refused_before_tokenizing(client):
    messages = [{"role": "user", "content": "word " * 26214}] * 9  # 9 x 131,070 characters: over 1 MiB rendered
    response = post(client, run_url(), {"messages": messages, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert "characters, over the limit of 1048576" in error_message(response)


def test_special_tokens_are_tokenized_in_linear_time(client):
    # 60,000 special tokens between bits of text: llama.cpp alone takes time quadratic in them (minutes here).
    turns = "<|im_start|>user\nhi<|im_end|>\n" * 4300
    response = post(client, run_url(), {"messages": [{"role": "user", "content": turns}] * 7})
    assert response.status_code == 400, response.text
    assert "the prompt is more than 1024 tokens" in error_message(response)


def test_tokenizing_counts_against_the_queue(tight):
    """One slot and one place in the queue: requests still being tokenized hold places too, so most of six long
    prompts sent at once get 429 rather than all of them tying up threads (before, none did)."""
    body = json.dumps({"messages": [{"role": "user", "content": "word " * 26214}] * 7, "max_tokens": 1})
    with httpx.Client(base_url=tight.url, timeout=60) as http, ThreadPoolExecutor(6) as pool:
        send = lambda _: http.post(run_url(), content=body, headers={"content-type": "application/json"})  # noqa: E731
        statuses = sorted(r.status_code for r in pool.map(send, range(6)))
    assert set(statuses) <= {400, 429} and 429 in statuses, statuses


def test_cached_prompts_are_scoped_per_token(guarded):
    """With several tokens, a prompt one token sent is reused for that token only: another token sending the same
    prompt computes it all (its `cached_tokens` and timing tell it nothing)."""
    body = {"prompt": "Tell me a secret about the number " + "seven " * 40, "max_tokens": 1}

    def cached(token: str) -> int:
        headers = {"authorization": f"Bearer {token}"}
        response = httpx.post(f"{guarded.url}{run_url()}", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["result"]["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(GUARD_TOKEN)
    assert cached(GUARD_TOKEN) > 0  # the same token still reuses its own prompt
    assert cached("file-token") == 0
