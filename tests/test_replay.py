"""Record and replay across servers (server/replay.py): the session's server plays the Cloudflare API, server A
(`--upstream .../client/v4/accounts/x --record DIR`) forwards to it and records, and server C (`--replay DIR`)
answers from the recordings byte for byte with no upstream and no model work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import MODEL, ServerProcess, metric, run_url

from workers_ai_local.replay import RequestKey

TOKEN = "recording-token-never-written"
BINDING = {"cf-consn-model-id": MODEL, "content-type": "application/json"}
RUN = {"prompt": "Say hello to Paris", "max_tokens": 5, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recordings")


@pytest.fixture(scope="module")
def recorder(server: ServerProcess, recordings: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("recorder") / "server.log"
    upstream = f"{server.url}/client/v4/accounts/x"
    args = ("--upstream", upstream, "--record", str(recordings), "--ctx-size", "256", "--parallel", "1")
    with ServerProcess(log, *args, env={"CLOUDFLARE_API_TOKEN": TOKEN}) as proc:
        yield proc


@pytest.fixture(scope="module")
def replayer(recordings: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("replayer") / "server.log"
    with ServerProcess(log, "--replay", str(recordings), "--ctx-size", "256", "--parallel", "1") as proc:
        yield proc


def raw(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + path, content=json.dumps(body), headers=headers, timeout=300)


def completion_tokens(url: str) -> float:
    return metric(httpx.get(url + "/metrics").text, "workers_ai_completion_tokens_total")


def test_answers_recorded_through_one_server_replay_byte_for_byte_from_another(
    recorder: ServerProcess, replayer: ServerProcess, recordings: Path
):
    requests = [
        (run_url(account="aaaa"), RUN),
        (run_url(account="aaaa"), {**RUN, "stream": True}),
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
        (run_url(account="aaaa"), {**RUN, "temperature": 9}),  # the upstream's 400 is an answer too
    ]
    recorded = [raw(recorder.url, path, body) for path, body in requests]
    assert [r.status_code for r in recorded] == [200, 200, 200, 200, 400]
    assert len(list(recordings.glob("*.json"))) == len(requests)
    for (path, body), first in zip(requests, recorded, strict=True):
        # Another account id, the same request: the account is not in the key.
        again = raw(replayer.url, path.replace("aaaa", "bbbb"), body)
        assert (again.status_code, again.headers["content-type"]) == (first.status_code, first.headers["content-type"])
        assert again.content == first.content, path
    assert recorded[1].text.count("\n\n") >= 4  # the stream was recorded event by event, then replayed whole
    assert completion_tokens(replayer.url) == 0  # no model work: every answer came from a file


def test_the_binding_replays_what_the_rest_api_recorded(recorder: ServerProcess, replayer: ServerProcess):
    envelope = raw(recorder.url, run_url(), RUN).json()
    stream = raw(recorder.url, run_url(), {**RUN, "stream": True}).content
    whole = raw(replayer.url, "/run?version=3", {"inputs": RUN, "options": {}}, BINDING)
    assert whole.headers["content-type"] == "application/json" and len(whole.headers["cf-ai-req-id"]) == 36
    assert whole.json() == envelope["result"]
    streamed = raw(replayer.url, "/run?version=3", {"inputs": {**RUN, "stream": True}, "options": {}}, BINDING)
    assert streamed.content == stream
    bad = raw(replayer.url, "/run", {"inputs": {**RUN, "temperature": 9}, "options": {}}, BINDING)
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 5006


def whole_recording(recordings: Path) -> Path:
    path = recordings / RequestKey("run", MODEL, RUN).file_name
    assert path.name.startswith("run-say-hello-to-paris-") and path.is_file()
    return path


def test_recordings_are_small_readable_files_stable_under_re_recording(recorder: ServerProcess, recordings: Path):
    raw(recorder.url, run_url(), RUN)
    names = sorted(p.name for p in recordings.glob("*.json"))
    first = whole_recording(recordings).read_text()
    # The same request, its keys in another order: the same file, its request written the same, its answer the
    # upstream's latest (which may differ from the last in its usage's cached tokens).
    latest = raw(recorder.url, run_url(), dict(reversed(list(RUN.items())))).json()
    assert sorted(p.name for p in recordings.glob("*.json")) == names
    again = whole_recording(recordings).read_text()
    assert again.split('"response"')[0] == first.split('"response"')[0]
    document = json.loads(again)
    assert document["request"] == {"kind": "run", "model": MODEL, "body": RUN}
    assert document["response"] == {"status": 200, "content_type": "application/json", "json": latest}
    streamed = [p for p in recordings.glob("run-*.json") if '"stream": true' in p.read_text()]
    events = json.loads(streamed[0].read_text())["response"]["events"]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    for recording in recordings.glob("*.json"):
        assert TOKEN not in recording.read_text() and len(recording.read_bytes()) < 20_000


def test_a_miss_fails_naming_the_request(replayer: ServerProcess):
    missing = {"prompt": "Never recorded", "max_tokens": 3}
    response = raw(replayer.url, run_url(), missing)
    assert response.status_code == 404
    [error] = response.json()["errors"]
    assert error["code"] == 7404
    assert "Never recorded" in error["message"] and "run-never-recorded-" in error["message"]
    assert "--on-miss local" in error["message"]
    with openai.OpenAI(api_key="unused", base_url=replayer.url + "/v1", max_retries=0) as oai:
        with pytest.raises(openai.NotFoundError, match="No recording of this request"):
            oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Never recorded"}])


def test_the_openai_sdk_reads_a_replayed_answer(recorder: ServerProcess, replayer: ServerProcess):
    with openai.OpenAI(api_key="unused", base_url=recorder.url + "/v1", max_retries=0) as oai:
        first = oai.chat.completions.create(**CHAT)
    with openai.OpenAI(api_key="unused", base_url=replayer.url + "/v1", max_retries=0) as oai:
        again = oai.chat.completions.create(**CHAT)
    assert again.model_dump() == first.model_dump()


def test_a_miss_can_fall_back_to_the_local_model(recordings: Path, tmp_path: Path):
    args = ("--replay", str(recordings), "--on-miss", "local", "--ctx-size", "256", "--parallel", "1")
    with ServerProcess(tmp_path / "local.log", *args) as proc:
        answer = raw(proc.url, run_url(), {"prompt": "Never recorded", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["result"]["usage"]["completion_tokens"] >= 1
        assert completion_tokens(proc.url) >= 1


@pytest.mark.parametrize(
    "args",
    [("--upstream", "http://127.0.0.1:9"), ("--replay", "/nonexistent/recordings"), ("--on-miss", "maybe")],
)
def test_bad_record_flags_stop_the_server_naming_them(tmp_path: Path, args: tuple[str, ...]):
    server = ServerProcess(tmp_path / "bad.log", *args)
    assert server.process.wait(timeout=60) != 0
    server.stop()
    assert args[0] in server.log() and "Traceback" not in server.log()
