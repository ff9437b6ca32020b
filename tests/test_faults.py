"""Faults on demand (server/faults.py): the platform's failures in its exact shapes on every surface, asked for per
request with the x-workers-ai-local-fault header or drawn per server with --fault at seeded rates."""

from __future__ import annotations

import json
from pathlib import Path

import cloudflare
import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, metric, run_url

HEADER = "x-workers-ai-local-fault"
DAILY = (
    "You have used up your daily free allocation of 10,000 neurons. Please upgrade to Cloudflare's Workers Paid "
    "plan if you would like to continue usage."
)
# Each fault by the name a test sets: its status, code and message as the platform sends them.
ERRORS = {
    "capacity": (429, 3040, "Capacity temporarily exceeded, please try again."),
    "3040": (429, 3040, "Capacity temporarily exceeded, please try again."),
    "daily-limit": (429, 3036, DAILY),
    "timeout": (408, 3007, "Request timeout"),
    "aborted": (408, 3008, "Request was aborted"),
    "internal": (500, 3043, "Internal server error"),
}
BODY = {"prompt": "Name a colour.", "max_tokens": 6, "temperature": 0}
BINDING = {"cf-consn-model-id": MODEL, "content-type": "application/json"}


def completion_tokens(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "workers_ai_completion_tokens_total")


@pytest.mark.parametrize("fault", list(ERRORS))
def test_an_error_fault_answers_in_the_envelope_and_costs_no_model_work(client: httpx.Client, fault: str):
    status, code, message = ERRORS[fault]
    before = completion_tokens(client)
    response = client.post(run_url(), json=BODY, headers={HEADER: fault})
    assert response.status_code == status
    assert response.json() == {"result": None, "success": False, "errors": [{"code": code, "message": message}],
                               "messages": []}  # fmt: skip
    binding = client.post("/run?version=3", json={"inputs": BODY, "options": {}}, headers={**BINDING, HEADER: fault})
    assert binding.status_code == status and binding.json()["errors"] == [{"code": code, "message": message}]
    assert len(binding.headers["cf-ai-req-id"]) == 36  # env.AI.lastRequestId, as on every binding answer
    assert completion_tokens(client) == before


def test_4006_as_users_meet_it(client: httpx.Client):
    response = client.post(run_url(), json=BODY, headers={HEADER: "4006"})
    assert response.status_code == 429
    [error] = response.json()["errors"]
    assert error["code"] == 4006
    assert error["message"].startswith("AiError: AiError: you have used up your daily free allocation of 10,000")


def test_the_official_sdk_sees_the_platforms_error(server: ServerProcess):
    with cloudflare.Cloudflare(api_token="unused", base_url=server.url + "/client/v4", max_retries=0) as cf:
        with pytest.raises(cloudflare.RateLimitError) as raised:
            cf.ai.run(MODEL, account_id="0123456789abcdef", prompt="Hi", extra_headers={HEADER: "capacity"})
    assert raised.value.status_code == 429
    assert raised.value.body["errors"] == [{"code": 3040, "message": ERRORS["capacity"][2]}]  # type: ignore[index]


@pytest.mark.parametrize("fault", ["capacity", "timeout", "internal"])
def test_openai_routes_answer_openais_error_object(server: ServerProcess, fault: str):
    status, code, message = ERRORS[fault]
    with openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0) as oai:
        with pytest.raises(openai.APIStatusError) as raised:
            oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], extra_headers={HEADER: fault}
            )
    assert raised.value.status_code == status
    assert raised.value.body == {"message": message, "type": raised.value.body["type"], "param": None,  # type: ignore[index]
                                 "code": str(code)}  # fmt: skip
    kinds = {429: "rate_limit_error", 408: "invalid_request_error", 500: "server_error"}
    assert raised.value.body["type"] == kinds[status]  # type: ignore[index]


def frames(raw: str) -> list[str]:
    return raw.strip().split("\n\n")


def test_a_stream_ends_after_n_pieces_with_the_final_error_event(client: httpx.Client):
    body = {**BODY, "stream": True}
    whole = frames(client.post(run_url(), json=body).text)
    assert whole[-1] == "data: [DONE]" and len(whole) >= 5  # three pieces at least, usage, [DONE]
    for surface, response in (
        ("rest", client.post(run_url(), json=body, headers={HEADER: "stream-3"})),
        ("binding", client.post("/run", json={"inputs": body, "options": {}}, headers={**BINDING, HEADER: "stream-3"})),
    ):
        assert response.status_code == 200, surface
        *pieces, final = frames(response.text)
        assert [json.loads(p.removeprefix("data: "))["response"] for p in pieces] == [
            json.loads(p.removeprefix("data: "))["response"] for p in whole[:3]
        ]
        assert json.loads(final.removeprefix("data: ")) == {"error": {"code": 3043, "message": "Internal server error"}}
    # stream-0: the error event alone.
    cut = client.post(run_url(), json=body, headers={HEADER: "stream-0"})
    assert frames(cut.text) == ['data: {"error":{"code":3043,"message":"Internal server error"}}']


def test_an_openai_stream_cut_reaches_the_sdk_as_an_error(server: ServerProcess):
    with openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0) as oai:
        stream = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, temperature=0,
            stream=True, extra_headers={HEADER: "stream-2"},
        )  # fmt: skip
        texts: list[str] = []
        with pytest.raises(openai.APIError, match="Internal server error"):
            for chunk in stream:
                texts.append(chunk.choices[0].delta.content or "")
    assert len([t for t in texts if t]) == 2


def test_a_cut_stream_stops_the_model(client: httpx.Client):
    before = completion_tokens(client)
    body = {"prompt": "Write a long story.", "max_tokens": 200, "temperature": 0, "stream": True}
    client.post(run_url(), json=body, headers={HEADER: "stream-1"})
    assert completion_tokens(client) - before < 100  # of 200 asked for


def test_a_fault_nobody_knows_is_bad_input(client: httpx.Client):
    response = client.post(run_url(), json=BODY, headers={HEADER: "meteor"})
    assert response.status_code == 400
    [error] = response.json()["errors"]
    assert error["code"] == 5006 and "unknown fault 'meteor'" in error["message"] and "stream-N" in error["message"]
    assert client.post(run_url(), json=BODY, headers={HEADER: "none"}).status_code == 200


def outcomes(url: str, count: int) -> list[int]:
    body = {"prompt": "Hi", "max_tokens": 1}  # the draws are what is tested, not the answers
    return [httpx.post(url + run_url(), json=body, timeout=60).status_code for _ in range(count)]


def test_server_faults_are_drawn_at_their_rate_and_repeat_with_the_seed(tmp_path: Path):
    args = ("--fault", "capacity:0.5", "--fault-seed", "7", "--ctx-size", "256", "--parallel", "1")
    runs = []
    for n in range(2):
        with ServerProcess(tmp_path / f"fault{n}.log", *args) as server:
            runs.append(outcomes(server.url, 16))
            # A request's own header wins over the draw, and takes no draw from the sequence.
            response = httpx.post(server.url + run_url(), json=BODY, headers={HEADER: "timeout"})
            assert response.status_code == 408
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 429} and 3 <= runs[0].count(429) <= 13


@pytest.mark.parametrize("spec", ["capacity", "capacity:2", "meteor:0.1", "capacity:0.6,timeout:0.6"])
def test_a_bad_fault_flag_stops_the_server_naming_it(tmp_path: Path, spec: str):
    server = ServerProcess(tmp_path / "bad.log", "--fault", spec)
    assert server.process.wait(timeout=60) != 0
    server.stop()
    assert "--fault" in server.log() or "unknown fault" in server.log()
    assert "Traceback" not in server.log()
