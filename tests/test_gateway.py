"""AI Gateway, locally: the gateway's URLs and the binding's gateway requests answered by the one run path, the
response cache (TTL, skip, custom key, streams replayed event for event, no model work for a hit), the logs through
the Cloudflare API's routes and the official SDKs, and the store kept on disk across a restart."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cloudflare import Cloudflare
from conftest import MODEL, ServerProcess, metric

ACCOUNT = "0123456789abcdef0123456789abcdef"


def gateway_id() -> str:
    return f"gw-{uuid.uuid4().hex[:12]}"


def run_path(gateway: str, account: str = ACCOUNT) -> str:
    return f"/v1/{account}/{gateway}/workers-ai/{MODEL}"


def completion_tokens(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "workers_ai_completion_tokens_total")


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[Cloudflare]:
    with Cloudflare(api_token="local-token", base_url=f"{server.url}/client/v4", max_retries=0) as cf:
        yield cf


def test_a_cached_answer_is_the_same_bytes_and_costs_no_model_work(client: httpx.Client, sdk: Cloudflare):
    gateway = gateway_id()
    body = {"prompt": "Name a colour.", "max_tokens": 12, "temperature": 0.9}
    headers = {"cf-aig-cache-ttl": "3600", "cf-aig-metadata": json.dumps({"user": "ada", "run": 7})}
    first = client.post(run_path(gateway), json=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.headers["cf-aig-cache-status"] == "MISS"
    before = completion_tokens(client)
    second = client.post(run_path(gateway), json=body, headers=headers)
    assert second.headers["cf-aig-cache-status"] == "HIT"
    assert second.content == first.content  # temperature 0.9: only a cache gives the same text twice
    assert completion_tokens(client) == before
    first_id, second_id = first.headers["cf-aig-log-id"], second.headers["cf-aig-log-id"]
    assert len(first_id) == 26 and first_id != second_id

    logs = list(sdk.ai_gateway.logs.list(gateway, account_id=ACCOUNT))
    assert [log.id for log in logs] == [second_id, first_id]  # newest first
    assert [log.cached for log in logs] == [True, False]
    usage = first.json()["result"]["usage"]
    for log in logs:
        assert (log.provider, log.model, log.path) == ("workers-ai", MODEL, MODEL)
        assert (log.tokens_in, log.tokens_out) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert json.loads(log.metadata) == {"user": "ada", "run": 7} and log.success and log.status_code == 200
    detail = sdk.ai_gateway.logs.get(first_id, account_id=ACCOUNT, gateway_id=gateway)
    assert detail.request_size == len(first.request.content) and detail.response_size == len(first.content)
    assert sdk.ai_gateway.logs.request(first_id, account_id=ACCOUNT, gateway_id=gateway) == body
    assert sdk.ai_gateway.logs.response(second_id, account_id=ACCOUNT, gateway_id=gateway) == first.json()
    assert [log.id for log in sdk.ai_gateway.logs.list(gateway, account_id=ACCOUNT, cached=True)] == [second_id]


def test_a_cached_stream_is_replayed_event_for_event(client: httpx.Client):
    gateway = gateway_id()
    body = {"prompt": "Count to five.", "max_tokens": 10, "stream": True}
    answers = []
    for status in ("MISS", "HIT"):
        with client.stream("POST", run_path(gateway), json=body, headers={"cf-aig-cache-ttl": "60"}) as response:
            assert response.headers["cf-aig-cache-status"] == status
            assert response.headers["content-type"].startswith("text/event-stream")
            answers.append([chunk for chunk in response.iter_raw()])
    assert b"".join(answers[1]) == b"".join(answers[0])
    assert b"".join(answers[0]).endswith(b"data: [DONE]\n\n") and b'"usage"' in b"".join(answers[0])


def test_no_ttl_no_cache(client: httpx.Client):
    gateway = gateway_id()
    for _ in range(2):
        response = client.post(run_path(gateway), json={"prompt": "Hi", "max_tokens": 2})
        assert response.headers["cf-aig-cache-status"] == "MISS"


def test_ttl_expires(client: httpx.Client):
    gateway = gateway_id()
    body = {"prompt": "Say yes.", "max_tokens": 3}
    statuses = []
    for pause in (0, 0, 1.2):
        time.sleep(pause)
        response = client.post(run_path(gateway), json=body, headers={"cf-aig-cache-ttl": "1"})
        statuses.append(response.headers["cf-aig-cache-status"])
    assert statuses == ["MISS", "HIT", "MISS"]


def test_skip_cache_runs_the_model(client: httpx.Client):
    gateway = gateway_id()
    body = {"prompt": "Say no.", "max_tokens": 3}
    ttl = {"cf-aig-cache-ttl": "60"}
    assert client.post(run_path(gateway), json=body, headers=ttl).headers["cf-aig-cache-status"] == "MISS"
    before = completion_tokens(client)
    skipped = client.post(run_path(gateway), json=body, headers=ttl | {"cf-aig-skip-cache": "true"})
    assert skipped.headers["cf-aig-cache-status"] == "MISS" and completion_tokens(client) > before
    assert client.post(run_path(gateway), json=body, headers=ttl).headers["cf-aig-cache-status"] == "HIT"


def test_a_custom_key_answers_any_request_that_names_it(client: httpx.Client):
    gateway = gateway_id()
    key = {"cf-aig-cache-key": "greeting"}  # no TTL: a custom key keeps its answer 5 minutes
    first = client.post(run_path(gateway), json={"prompt": "Say hello.", "max_tokens": 4}, headers=key)
    other = client.post(run_path(gateway), json={"prompt": "Something else.", "max_tokens": 4}, headers=key)
    assert (first.headers["cf-aig-cache-status"], other.headers["cf-aig-cache-status"]) == ("MISS", "HIT")
    assert other.content == first.content
    unkeyed = client.post(run_path(gateway), json={"prompt": "Something else.", "max_tokens": 4})
    assert unkeyed.headers["cf-aig-cache-status"] == "MISS"


def test_identical_requests_in_flight_together_each_run(client: httpx.Client, server: ServerProcess):
    """As on the platform, whose cache is 'volatile': the second of two simultaneous requests does not wait for
    the first to be cached."""
    gateway = gateway_id()
    body = {"prompt": "Tell me a story.", "max_tokens": 24}
    statuses: list[str] = []

    def send() -> None:
        response = httpx.post(
            server.url + run_path(gateway), json=body, headers={"cf-aig-cache-ttl": "60"}, timeout=120
        )
        statuses.append(response.headers["cf-aig-cache-status"])

    before = completion_tokens(client)
    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == ["MISS", "MISS"]
    assert completion_tokens(client) - before == 2 * 24
    assert (
        client.post(run_path(gateway), json=body, headers={"cf-aig-cache-ttl": "60"}).headers["cf-aig-cache-status"]
        == "HIT"
    )


def test_collect_log_false_keeps_no_log(client: httpx.Client, sdk: Cloudflare):
    gateway = gateway_id()
    response = client.post(
        run_path(gateway), json={"prompt": "Hi", "max_tokens": 2}, headers={"cf-aig-collect-log": "false"}
    )
    assert response.status_code == 200 and "cf-aig-log-id" not in response.headers
    assert list(sdk.ai_gateway.logs.list(gateway, account_id=ACCOUNT)) == []


def test_bad_gateway_headers_are_refused_in_the_routes_shape(client: httpx.Client):
    gateway = gateway_id()
    refused = client.post(run_path(gateway), json={"prompt": "Hi"}, headers={"cf-aig-cache-ttl": "soon"})
    assert refused.status_code == 400
    assert "cf-aig-cache-ttl must be a number of seconds" in refused.json()["errors"][0]["message"]
    refused = client.post(
        f"/v1/{ACCOUNT}/{gateway}/workers-ai/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"cf-aig-metadata": "[1]"},
    )
    assert refused.status_code == 400 and "cf-aig-metadata" in refused.json()["error"]["message"]
    # A model error is the surface's own, through the gateway too.
    bad = client.post(run_path(gateway), json={"prompt": "Hi", "temperature": 9})
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 5006
    assert bad.headers["cf-aig-cache-status"] == "MISS"


@pytest.mark.parametrize("route", ["workers-ai/v1", "compat"])
def test_the_openai_sdk_on_the_gateway_urls(server: ServerProcess, sdk: Cloudflare, route: str):
    gateway = gateway_id()
    model = MODEL if route == "workers-ai/v1" else f"workers-ai/{MODEL}"
    with openai.OpenAI(
        api_key="unused",
        base_url=f"{server.url}/v1/{ACCOUNT}/{gateway}/{route}",
        max_retries=0,
        default_headers={"cf-aig-cache-ttl": "60"},
    ) as client:
        messages = [{"role": "user", "content": "Name a fruit."}]
        answers = [client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8)]
        answers.append(client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=8))
        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True))
    assert [a.headers["cf-aig-cache-status"] for a in answers] == ["MISS", "HIT"]
    first, second = (a.parse() for a in answers)
    assert first.choices[0].message.content and second.model_dump() == first.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    logs = list(sdk.ai_gateway.logs.list(gateway, account_id=ACCOUNT))
    assert [(log.cached, log.path, log.request_type) for log in logs] == [
        (False, "chat/completions", "stream"),
        (True, "chat/completions", "json"),
        (False, "chat/completions", "json"),
    ]


def test_compat_wants_a_provider_in_the_model(client: httpx.Client):
    response = client.post(
        f"/v1/{ACCOUNT}/{gateway_id()}/compat/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model" and "workers-ai/@cf/" in response.json()["error"]["message"]


def test_the_bindings_gateway_request(client: httpx.Client, sdk: Cloudflare):
    gateway = gateway_id()
    options = {"gateway": {"id": gateway, "cacheTtl": 60, "metadata": {"team": "qa"}}}
    body = {"inputs": {"prompt": "Say hi.", "max_tokens": 4}, "options": options}
    headers = {"cf-consn-model-id": MODEL}
    answers = [client.post("/ai-gateway/run?version=3", json=body, headers=headers) for _ in range(2)]
    assert [a.headers["cf-aig-cache-status"] for a in answers] == ["MISS", "HIT"]
    assert answers[1].headers["content-type"] == "application/json"  # the binding hands back the bare result
    assert answers[1].json() == answers[0].json() and set(answers[0].json()) == {"response", "tool_calls", "usage"}
    assert answers[0].headers["cf-ai-req-id"] != answers[1].headers["cf-ai-req-id"]
    log = sdk.ai_gateway.logs.get(answers[1].headers["cf-aig-log-id"], account_id=ACCOUNT, gateway_id=gateway)
    assert log.cached and json.loads(log.metadata) == {"team": "qa"}
    missing = client.post("/ai-gateway/run?version=3", json={"inputs": {"prompt": "x"}, "options": {}}, headers=headers)
    assert missing.status_code == 400 and "options.gateway.id" in missing.json()["errors"][0]["message"]


def test_an_unknown_log_is_a_404(client: httpx.Client):
    response = client.get(f"/client/v4/accounts/{ACCOUNT}/ai-gateway/gateways/nobody/logs/01ABC")
    assert response.status_code == 404 and response.json()["success"] is False


def test_the_store_outlives_a_restart_and_keeps_its_bounds(tmp_path: Path):
    folder = tmp_path / "gateway"
    flags = ("--gateway-dir", str(folder), "--gateway-max-logs", "3", "--ctx-size", "512", "--parallel", "1")
    body = {"prompt": "Say cached.", "max_tokens": 4}
    ttl = {"cf-aig-cache-ttl": "600"}
    with ServerProcess(tmp_path / "first.log", *flags) as first:
        computed = httpx.post(first.url + run_path("ci"), json=body, headers=ttl, timeout=120)
        assert computed.headers["cf-aig-cache-status"] == "MISS"
    with ServerProcess(tmp_path / "second.log", *flags) as second:
        again = httpx.post(second.url + run_path("ci"), json=body, headers=ttl, timeout=120)
        assert again.headers["cf-aig-cache-status"] == "HIT" and again.content == computed.content
        for _ in range(3):
            httpx.post(second.url + run_path("ci"), json=body, headers=ttl, timeout=120)
        logs = httpx.get(f"{second.url}/client/v4/accounts/{ACCOUNT}/ai-gateway/gateways/ci/logs").json()
        assert logs["result_info"]["total_count"] == 3  # the oldest two went
        assert computed.headers["cf-aig-log-id"] not in [log["id"] for log in logs["result"]]
    assert (folder / "gateway.sqlite3").is_file()
