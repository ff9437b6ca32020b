"""The Worker binding's endpoint over plain HTTP: what workerd and Miniflare's proxy send, and the details of the
answers they rely on. Real Workers drive it in test_workers.py; the shared behaviours are in test_matrix.py."""

from __future__ import annotations

import json
import uuid

import httpx
from conftest import MODEL
from surfaces import SURFACES, WorkerBinding

DIRECT, PROXIED = (s for s in SURFACES if isinstance(s, WorkerBinding))
HELLO = {"prompt": "Say hi.", "max_tokens": 3}


def test_every_answer_names_its_request(client: httpx.Client):
    answers = [surface.post(client, HELLO) for surface in (DIRECT, PROXIED)]
    answers.append(DIRECT.post(client, {**HELLO, "temperature": 9}))
    with DIRECT.open_stream(client, HELLO) as streamed:
        streamed.read()
        answers.append(streamed)
    ids = [answer.headers["cf-ai-req-id"] for answer in answers]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i) for i in ids)


def test_proxied_answers_are_marked_as_the_backends_own(client: httpx.Client):
    assert PROXIED.post(client, HELLO).headers["mf-forwarded-response"] == "true"
    assert PROXIED.post(client, {**HELLO, "temperature": 9}).headers["mf-forwarded-response"] == "true"
    assert "mf-forwarded-response" not in DIRECT.post(client, HELLO).headers


def test_miniflares_websocket_probe_gets_501(client: httpx.Client):
    upgrade = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    response = client.get("/?MF-Binding=AI", headers={**upgrade, "sec-websocket-version": "13"})
    assert response.status_code == 501 and response.json()["errors"][0]["code"] == 7000
    assert client.get("/").headers["content-type"].startswith("text/html")  # the playground is still there


def test_models_through_the_proxy(client: httpx.Client):
    headers = {"MF-Binding": "AI", "MF-URL": "https://workers-binding.ai/ai-api/models/search?search=llama"}
    found = client.get("/", headers=headers).json()
    assert [entry["name"] for entry in found["result"]] == [MODEL]


def test_the_proxy_routes_only_the_bindings_paths(client: httpx.Client):
    headers = {"MF-Binding": "AI", "MF-URL": "https://workers-binding.ai/v1/chat/completions"}
    response = client.post("/", headers=headers, json={"inputs": HELLO})
    assert response.status_code == 404 and "AI binding" in response.json()["errors"][0]["message"]
    elsewhere = client.post("/client/v4/x", headers={**headers, "MF-URL": "https://workers-binding.ai/run"})
    assert elsewhere.status_code == 404


def test_a_body_or_model_the_binding_never_sends_is_refused(client: httpx.Client):
    no_model = client.post("/run", json={"inputs": HELLO})
    assert (no_model.status_code, no_model.json()["errors"][0]["code"]) == (400, 5007)
    bare = client.post("/run", json=HELLO, headers={"cf-consn-model-id": MODEL})
    assert (bare.status_code, bare.json()["errors"][0]["code"]) == (400, 5006)
    options = client.post("/run", json={"inputs": HELLO, "options": 3}, headers={"cf-consn-model-id": MODEL})
    assert options.status_code == 400 and "options" in options.json()["errors"][0]["message"]


def test_session_affinity_rides_in_the_original_headers(client: httpx.Client):
    system = "You are a meticulous assistant who remembers everything. " * 12
    first = [{"role": "system", "content": system}, {"role": "user", "content": "My name is Ada."}]
    path, headers, payload = PROXIED.request({"messages": first, "max_tokens": 8, "temperature": 0})
    headers["MF-Header-x-session-affinity"] = "binding-session"
    answer = client.post(path, json=payload, headers=headers).json()
    second = [*first, {"role": "assistant", "content": answer["response"]}, {"role": "user", "content": "Who am I?"}]
    payload["inputs"]["messages"] = second
    again = client.post(path, content=json.dumps(payload), headers=headers).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= answer["usage"]["prompt_tokens"] // 64 * 64
