"""--strict over HTTP: JSON mode gets the platform's 5025, extension routes answer as routes the platform lacks,
extension fields are refused or ignored as production would, and what the platform serves is served unchanged."""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL, ServerProcess, run_url
from surfaces import ACCOUNT
from test_contract import assert_error, assert_ok

JSON_MODE = {"type": "json_object"}
PLATFORM_MESSAGE = "This model doesn't suuport JSON Schema."
BINDING_HEADERS = {"cf-consn-model-id": MODEL, "content-type": "application/json"}
OPENAI = f"/client/v4/accounts/{ACCOUNT}/ai/v1"


@pytest.fixture(scope="module")
def http(strict: ServerProcess):
    with httpx.Client(base_url=strict.url, timeout=60) as client:
        yield client


def test_json_mode_gets_the_platforms_5025_on_every_surface(http: httpx.Client):
    body = {"messages": [{"role": "user", "content": "A JSON object, please."}], "response_format": JSON_MODE}
    assert_error(http.post(run_url(), json=body), 400, 5025)
    assert http.post(run_url(), json=body).json()["errors"][0]["message"] == PLATFORM_MESSAGE
    binding = http.post("/run?version=3", json={"inputs": body, "options": {}}, headers=BINDING_HEADERS)
    assert binding.json()["errors"] == [{"code": 5025, "message": PLATFORM_MESSAGE}]
    chat = http.post(f"{OPENAI}/chat/completions", json={"model": MODEL, **body})
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "5025" and chat.json()["error"]["message"] == PLATFORM_MESSAGE


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", f"/ai/run/{MODEL}"),
        ("POST", f"/ai/tokenize/{MODEL}"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", f"{OPENAI}/completions"),
        ("GET", f"{OPENAI}/models"),
    ],
)
def test_extension_routes_answer_as_unknown_routes(http: httpx.Client, method: str, path: str):
    response = http.request(method, path, json={"model": MODEL, "prompt": "Hi", "messages": []})
    assert response.status_code == 404, response.text
    if "/v1/" in path:
        error = response.json()["error"]
        assert error["type"] == "not_found_error" and "off under --strict" in error["message"]
    else:
        assert_error(response, 404, 7003)


def test_what_the_platform_serves_is_served(http: httpx.Client):
    body = {"prompt": "Say hi.", "max_tokens": 2}
    assert assert_ok(http.post(run_url(), json=body))["usage"]["completion_tokens"] >= 1
    bound = http.post("/run?version=3", json={"inputs": body, "options": {}}, headers=BINDING_HEADERS)
    assert bound.status_code == 200 and bound.json()["usage"]["completion_tokens"] >= 1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    assert http.post(f"{OPENAI}/chat/completions", json=chat).json()["choices"][0]["message"]["role"] == "assistant"
    # Production's Chat Completions reads rejectIfBusy from `options` only: a top-level one is ignored there.
    ignored = http.post(f"{OPENAI}/chat/completions", json={**chat, "rejectIfBusy": "not even a boolean"})
    assert ignored.status_code == 200, ignored.text
    lora = http.post(f"{OPENAI}/chat/completions", json={**chat, "lora": "my-adapter"})
    assert lora.status_code == 400 and lora.json()["error"]["param"] == "lora"
    for path in ("/health", "/metrics", "/openapi.json", "/"):
        assert http.get(path).status_code == 200, path
