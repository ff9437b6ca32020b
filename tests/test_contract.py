"""The request contract over HTTP: routes, schema bounds of every parameter, and the error envelope."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, PROJECT_ROOT, run_url

SCHEMA = json.loads((PROJECT_ROOT / "schemas" / "llama-3.1-8b-instruct-fast.input.schema.json").read_text())
BRANCHES = {branch["title"]: branch for branch in SCHEMA["oneOf"]}
BASE = {"Prompt": {"prompt": "Say hi."}, "Messages": {"messages": [{"role": "user", "content": "Say hi."}]}}


def assert_error(response: httpx.Response, status: int, code: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["success"] is False
    assert body["result"] is None
    assert body["messages"] == []
    assert body["errors"][0]["code"] == code
    message = body["errors"][0]["message"]
    for needle in needles:
        assert needle in message, message
    return message


def assert_ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    return body["result"]


def counts(usage: dict) -> tuple[int, int, int]:
    """Token counts of a usage object, without the cache detail that depends on what ran before."""
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


# The model page's published bounds, written out here rather than read from schemas/: a schema file that loosens
# or tightens one fails these tests.
PUBLISHED_BOUNDS: dict[str, dict[str, int | float]] = {
    "temperature": {"minimum": 0, "maximum": 5},
    "top_p": {"minimum": 0, "maximum": 2},
    "top_k": {"minimum": 1, "maximum": 50},
    "seed": {"minimum": 1, "maximum": 9999999999},
    "repetition_penalty": {"minimum": 0, "maximum": 2},
    "frequency_penalty": {"minimum": 0, "maximum": 2},
    "presence_penalty": {"minimum": 0, "maximum": 2},
}
PROMPT_LENGTH = {"minLength": 1, "maxLength": 131072}
MESSAGE_CONTENT_MAX = 131072
INTEGERS = {"top_k", "seed"}


def bound_cases() -> list[tuple[str, str, str, object, object]]:
    """(branch, property, bound keyword, a value just past the bound, the bound itself) for every bound."""
    cases = []
    for branch in BRANCHES:
        for name, bounds in PUBLISHED_BOUNDS.items():
            step = 1 if name in INTEGERS else 0.01
            cases.append((branch, name, "minimum", bounds["minimum"] - step, bounds["minimum"]))
            cases.append((branch, name, "maximum", bounds["maximum"] + step, bounds["maximum"]))
    low, high = PROMPT_LENGTH["minLength"], PROMPT_LENGTH["maxLength"]
    cases.append(("Prompt", "prompt", "minLength", "x" * (low - 1), "x" * low))
    cases.append(("Prompt", "prompt", "maxLength", "x" * (high + 1), "x" * high))
    return cases


CASES = bound_cases()


def test_the_schema_publishes_exactly_the_pinned_bounds():
    for branch in BRANCHES.values():
        published = {
            name: {k: v for k, v in prop.items() if k in ("minimum", "maximum")}
            for name, prop in branch["properties"].items()
            if "minimum" in prop or "maximum" in prop
        }
        assert published == PUBLISHED_BOUNDS
    prompt = BRANCHES["Prompt"]["properties"]["prompt"]
    assert {k: prompt[k] for k in PROMPT_LENGTH} == PROMPT_LENGTH
    content = BRANCHES["Messages"]["properties"]["messages"]["items"]["properties"]["content"]
    assert content["maxLength"] == MESSAGE_CONTENT_MAX


@pytest.mark.parametrize(
    ("branch", "name", "keyword", "past", "at"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES]
)
def test_schema_bound(client, branch, name, keyword, past, at):
    if name == "content":  # messages[].content: the bound lives inside the array's items
        pytest.skip("covered by test_message_content_bound")
    body = {**BASE[branch], "max_tokens": 2, name: past}
    message = assert_error(client.post(run_url(), json=body), 400, 5006, "AiError: Bad input", f"'/{name}'")
    if keyword in ("minimum", "maximum"):
        assert f"{'>=' if keyword == 'minimum' else '<='} {at}" in message
    at_bound = client.post(run_url(), json={**body, name: at})
    if keyword == "maxLength":
        # The longest prompt the schema allows is far more than the test server's context holds.
        assert_error(at_bound, 400, 5006, "context window")
    else:
        assert_ok(at_bound)


def test_message_content_bound(client):
    too_long = {"messages": [{"role": "user", "content": "x" * (MESSAGE_CONTENT_MAX + 1)}]}
    message = f"at most {MESSAGE_CONTENT_MAX}"
    assert_error(client.post(run_url(), json=too_long), 400, 5006, "'/messages/0/content'", message)


def test_type_mismatch_names_path_and_types(client):
    body = {"messages": [{"role": "user", "content": ["not", "a", "string"]}]}
    assert_error(
        client.post(run_url(), json=body),
        400,
        5006,
        "oneOf at '/' not met, 0 matches",
        "required properties at '/' are 'prompt'",
        "Type mismatch of '/messages/0/content', 'array' not in 'string'",
    )


def test_integer_parameters_reject_fractions(client):
    assert_error(client.post(run_url(), json={"prompt": "x", "top_k": 2.5}), 400, 5006, "'/top_k'", "'integer'")


def test_prompt_and_messages_together_match_both_branches(client):
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    assert_error(client.post(run_url(), json=body), 400, 5006, "2 matches")


def test_neither_prompt_nor_messages(client):
    assert_error(client.post(run_url(), json={"max_tokens": 3}), 400, 5006, "0 matches", "'prompt'", "'messages'")


def test_messages_entries_need_role_and_content(client):
    body = {"messages": [{"content": "no role"}]}
    assert_error(client.post(run_url(), json=body), 400, 5006, "required properties at '/messages/0' are 'role'")


def test_tools_must_take_a_published_shape(client):
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "lookup"}]}
    assert_error(client.post(run_url(), json=body), 400, 5006, "oneOf at '/tools/0' not met")


def test_max_tokens_below_one(client):
    assert_error(client.post(run_url(), json={"prompt": "x", "max_tokens": 0}), 400, 5006, "'/max_tokens' must be >= 1")


def test_not_json(client):
    response = client.post(run_url(), content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, 5006, "not valid JSON")


def test_body_not_an_object(client):
    assert_error(client.post(run_url(), json=["prompt"]), 400, 5006, "Type mismatch of '/', 'array' not in 'object'")


def test_empty_body(client):
    assert_error(client.post(run_url(), content=b""), 400, 3003, "missing")


def test_body_too_large(client):
    assert_error(client.post(run_url(), content=b" " * (5 * 1024 * 1024)), 413, 3006, "too large")


def test_unknown_model(client):
    assert_error(client.post(run_url("@cf/meta/llama-9-unknown"), json={"prompt": "x"}), 400, 5007, "No such model")


def test_unknown_lora(client):
    body = {"prompt": "x", "lora": "no-such-adapter"}
    assert_error(client.post(run_url(), json=body), 404, 3042, "no-such-adapter")


def test_unknown_route_and_method_use_the_envelope(client):
    assert_error(client.get("/client/v4/accounts/x/ai/nothing"), 404, 7003, "Could not route")
    refused = client.get(run_url())
    assert_error(refused, 405, 7001, "GET")
    assert refused.headers["allow"] == "POST"  # RFC 9110: a 405 names the methods that are allowed
    # Every route of the path counts, and an OpenAI path answers in OpenAI's error shape.
    assert client.put("/client/v4/accounts/x/ai/finetunes").headers["allow"] == "GET, HEAD, POST"
    openai = client.delete("/v1/chat/completions")
    assert openai.status_code == 405 and openai.headers["allow"] == "POST"
    assert openai.json()["error"]["message"] == "Method DELETE not allowed here"


@pytest.mark.parametrize(
    "path",
    [
        run_url(),
        run_url(MODEL.replace("/", "%2F")),
        f"/ai/run/{MODEL}",
        f"/ai/run/{MODEL.replace('/', '%2F')}",
    ],
)
def test_route_forms(client, path):
    result = assert_ok(client.post(path, json={"prompt": "Say hi.", "max_tokens": 3}))
    assert result["usage"]["completion_tokens"] <= 3


def test_form_encoded_curl_body_is_read_as_json(client):
    # curl -d sends application/x-www-form-urlencoded; the seed's curl example relies on the body being read as JSON.
    response = client.post(
        run_url(),
        content=b'{"prompt": "Say hi.", "max_tokens": 2}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert_ok(response)


def test_garbage_bytes_then_server_still_serves(server, client):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"\x00\xff NOT HTTP \r\n\r\n")
        sock.recv(1024)
    assert_ok(client.post(run_url(), json={"prompt": "Say hi.", "max_tokens": 2}))


def test_schemas_are_the_published_ones():
    spec = PROJECT_ROOT.parent / "shared" / "spec"
    if not spec.is_dir():
        pytest.skip("../shared/spec is not beside this checkout")
    for name in ("input", "output"):
        ours = Path(PROJECT_ROOT / "schemas" / f"llama-3.1-8b-instruct-fast.{name}.schema.json")
        theirs = spec / f"llama-3.1-8b-instruct-fast.{name}.schema.json"
        assert json.loads(ours.read_text()) == json.loads(theirs.read_text())
