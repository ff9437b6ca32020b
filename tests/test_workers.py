"""Workers in real workerd, with env.AI served by this server: the seed's Worker examples unchanged, through
Miniflare's AI binding (its connection string pointed here), through `wrangler dev` with the shipped entrypoint
(workers/ai-local) as a service binding named AI, and through vitest in workerd.

The npm packages are installed by `make test` (workers/package-lock.json) when node is present; without node these
tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import GUARD_TOKEN, MODEL, PROJECT_ROOT, ServerProcess, free_port, metric, wait_for, wait_idle

WORKERS = PROJECT_ROOT / "workers"
BIN = WORKERS / "node_modules" / ".bin"
EXAMPLES = WORKERS / "examples" / "wrangler.toml"


def _node_version() -> tuple[int, ...]:
    if shutil.which("node") is None:
        return ()
    printed = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    return tuple(int(part) for part in printed.strip().lstrip("v").split(".")[:2])


def _skip_reason() -> str | None:
    if _node_version() < (20, 3):
        return "node >= 20.3 is not installed: the Worker tests need it (then make test installs workers/)"
    if not (BIN / "wrangler").exists():
        return "workers/node_modules is missing: run `make test` (it runs npm ci in workers/ when node is present)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def node_env(home: Path) -> dict[str, str]:
    """Wrangler offline and quiet: no metrics, error reports, update banner or request.cf download, no account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
    return env | {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "WRANGLER_SEND_METRICS": "false",
        "WRANGLER_SEND_ERROR_REPORTS": "false",
        "WRANGLER_HIDE_BANNER": "true",
        "DO_NOT_TRACK": "1",
        "CLOUDFLARE_CF_FETCH_ENABLED": "false",
        "NO_COLOR": "1",
    }


class WorkerHost:
    """A node process serving a Worker on a loopback port, its output in a log file."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str], ready: str, port: int) -> None:
        self.kind = Path(command[1] if command[0] == "node" else command[0]).stem
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command, cwd=WORKERS, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while ready not in log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[0]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # wrangler runs workerd as a child
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples' TypeScript, built by wrangler's own bundler, as `wrangler deploy` would upload it."""
    out = tmp_path_factory.mktemp("bundle")
    subprocess.run(
        [BIN / "wrangler", "deploy", "--dry-run", "--outdir", out, "-c", EXAMPLES, "--env", ""],
        cwd=WORKERS, env=node_env(out), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return out / "index.js"


def miniflare(bundle: Path, connection: str, folder: Path) -> WorkerHost:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = ["node", str(WORKERS / "scripts" / "miniflare.mjs"), str(bundle), connection, str(port)]
    return WorkerHost(command, folder / "miniflare.log", node_env(folder), "ready http://", port)


def wrangler_dev(folder: Path, server_url: str, token: str | None = None) -> WorkerHost:
    # The shipped entrypoint, unchanged; only its .dev.vars (what a user writes) says where the server is.
    folder.mkdir(parents=True, exist_ok=True)
    entrypoint = folder / "ai-local"
    shutil.copytree(WORKERS / "ai-local", entrypoint)
    dev_vars = f"AI_SERVER_URL={server_url}\n" + (f"AI_SERVER_TOKEN={token}\n" if token else "")
    (entrypoint / ".dev.vars").write_text(dev_vars)
    port = free_port()
    command = [
        str(BIN / "wrangler"), "dev", "-c", str(EXAMPLES), "-c", str(entrypoint / "wrangler.toml"), "--env", "local",
        "--ip", "127.0.0.1", "--port", str(port), "--inspector-port", str(free_port()),
        "--persist-to", str(folder / "state"), "--log-level", "info",
    ]  # fmt: skip
    return WorkerHost(command, folder / "wrangler.log", node_env(folder), "Ready on", port)


@pytest.fixture(scope="module", params=["miniflare", "wrangler-dev"])
def worker(
    request: pytest.FixtureRequest, server: ServerProcess, bundle: Path, tmp_path_factory
) -> Iterator[WorkerHost]:
    folder = tmp_path_factory.mktemp(request.param)
    host = miniflare(bundle, server.url, folder) if request.param == "miniflare" else wrangler_dev(folder, server.url)
    try:
        yield host
    finally:
        host.stop()


def sse_events(raw: str) -> list[dict]:
    frames = raw.strip().split("\n\n")
    assert frames[-1] == "data: [DONE]", raw[-300:]
    return [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]


def test_seed_worker_gets_a_real_completion(worker: WorkerHost):
    response = httpx.get(worker.url + "/seed/worker", timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"response", "tool_calls", "usage"}, result
    assert result["response"].strip() and result["tool_calls"] == []
    usage = result["usage"]
    assert usage["prompt_tokens"] > 10 and 1 <= usage["completion_tokens"] <= 256


def test_seed_streaming_worker_streams_incrementally(worker: WorkerHost):
    arrivals: list[tuple[float, str]] = []
    started = time.monotonic()
    with httpx.stream("GET", worker.url + "/seed/worker-streaming", timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for chunk in response.iter_text():
            arrivals.append((time.monotonic() - started, chunk))
    events = sse_events("".join(chunk for _, chunk in arrivals))
    *pieces, final = events
    assert "".join(e["response"] for e in pieces).strip()
    assert final["response"] == "" and final["usage"]["completion_tokens"] >= len(pieces) > 1
    # Incremental: text arrived in many chunks, spread over the generation, not in one piece at the end.
    assert len(arrivals) > 5
    assert arrivals[-1][0] - arrivals[0][0] > 0.3 * arrivals[-1][0]


def probe(worker: WorkerHost, path: str) -> dict:
    response = httpx.get(worker.url + path, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_tools_give_tool_calls(worker: WorkerHost):
    result = probe(worker, "/tools")
    assert result["ok"], result
    call = result["value"]["tool_calls"][0]
    assert call["name"] == "getWeather" and isinstance(call["arguments"]["city"], str)


def test_bad_input_raises_in_the_worker_with_5006(worker: WorkerHost):
    result = probe(worker, "/bad-input")
    assert not result["ok"]
    assert result["name"] == "InferenceUpstreamError", result
    assert (
        result["message"].startswith("5006: AiError: Bad input: ")
        and "'/temperature' must be <= 5" in result["message"]
    )


def test_unknown_model_raises_the_bindings_error(worker: WorkerHost):
    result = probe(worker, "/unknown-model")
    assert (result["ok"], result["name"]) == (False, "InferenceUpstreamError")
    assert result["message"].startswith("5007: No such model @cf/meta/llama-9-unknown")


def test_second_turn_of_a_session_reports_cached_tokens(worker: WorkerHost):
    usage = probe(worker, "/session")
    assert usage["first"]["prompt_tokens"] > 64
    assert usage["second"]["prompt_tokens_details"]["cached_tokens"] >= 64


def test_binding_options_and_models(worker: WorkerHost, server: ServerProcess):
    raw = probe(worker, "/raw-response")
    assert (raw["status"], raw["contentType"]) == (200, "application/json")
    assert set(raw["body"]) == {"response", "tool_calls", "usage"}
    gateway = probe(worker, f"/gateway?id=workers-{worker.kind}")
    first, second = gateway["answers"]
    assert second["value"] == first["value"] == gateway["body"]  # temperature 1: the same answer is the cache's
    assert gateway["status"] == "HIT" and len(gateway["rawLogId"]) == 26
    logs = httpx.get(f"{server.url}/client/v4/accounts/local/ai-gateway/gateways/workers-{worker.kind}/logs").json()
    assert [log["cached"] for log in logs["result"]] == [True, True, False]
    assert {log["metadata"] for log in logs["result"]} == {'{"suite": "workers"}'}
    if worker.kind == "miniflare":  # workerd's own binding keeps the log id; an RPC entrypoint cannot (see README)
        assert [answer["logId"] for answer in reversed(gateway["answers"])] == [log["id"] for log in logs["result"][1:]]
    models = probe(worker, "/models")
    assert models["ok"] and MODEL in [m["name"] for m in models["value"]]
    if worker.kind == "miniflare":  # an RPC entrypoint cannot keep per-call state (see docs/workers.md)
        assert len(probe(worker, "/request-id")["id"]) == 36


def test_reject_if_busy_fails_fast_in_a_worker(tight: ServerProcess, bundle: Path, tmp_path):
    host = miniflare(bundle, tight.url, tmp_path / "busy")
    stop, opened = threading.Event(), threading.Event()

    def hold_the_slot() -> None:
        body = {"prompt": "1, 2, 3, 4, 5,", "raw": True, "max_tokens": 900, "temperature": 0, "stream": True}
        with httpx.stream("POST", tight.url + f"/client/v4/accounts/a/ai/run/{MODEL}", json=body, timeout=60) as r:
            opened.set()
            for _ in r.iter_bytes():
                if stop.is_set():
                    return

    holder = threading.Thread(target=hold_the_slot)
    try:
        holder.start()
        wait_for(tight.url, "slots_busy", 1)
        started = time.monotonic()
        result = probe(host, "/reject-if-busy")
        assert time.monotonic() - started < 5
        assert (result["ok"], result["name"]) == (False, "InferenceUpstreamError"), result
        assert result["message"] == "3040: Capacity temporarily exceeded, please try again."
        stop.set()
        holder.join(30)
        wait_for(tight.url, "slots_busy", 0)
        assert probe(host, "/reject-if-busy")["ok"]
    finally:
        stop.set()
        holder.join(30)
        host.stop()


def completion_tokens(client: httpx.Client) -> float:
    return metric(client.get("/metrics").text, "workers_ai_completion_tokens_total")


def test_a_worker_that_drops_the_stream_cancels_generation(worker: WorkerHost, client: httpx.Client):
    wait_idle(client, timeout=30)
    before = completion_tokens(client)
    response = httpx.get(worker.url + "/drop-stream", timeout=60)
    assert response.text.startswith("data: {")
    wait_idle(client, timeout=5)
    time.sleep(0.2)
    assert completion_tokens(client) - before < 600  # of 900 asked for


def test_a_client_leaving_the_seed_stream_cancels_generation(worker: WorkerHost, client: httpx.Client):
    wait_idle(client, timeout=30)
    before = completion_tokens(client)
    with httpx.stream("GET", worker.url + "/seed/worker-streaming", timeout=60) as response:
        assert next(response.iter_text()).startswith("data: ")
    wait_idle(client, timeout=5)
    time.sleep(0.2)
    assert completion_tokens(client) - before < 200  # the seed asks for the default 256


def test_with_api_tokens_the_binding_is_no_open_door(guarded: ServerProcess, bundle: Path, tmp_path):
    refused = miniflare(bundle, guarded.url, tmp_path / "open")
    try:
        result = probe(refused, "/bad-input")  # any call: it is refused before its input is looked at
        assert result["message"] == "10000: Authentication error", result
    finally:
        refused.stop()
    for host in (
        miniflare(bundle, f"{guarded.url}/binding/{GUARD_TOKEN}", tmp_path / "token"),
        wrangler_dev(tmp_path / "dev", guarded.url, token=GUARD_TOKEN),
    ):
        try:
            assert probe(host, "/tools")["ok"]
        finally:
            host.stop()
    assert GUARD_TOKEN not in guarded.log()  # the token in the connection string never reaches the log


def test_vitest_runs_workers_against_the_server(server: ServerProcess, tmp_path):
    env = node_env(tmp_path) | {"WORKERS_AI_LOCAL": server.url}
    run = subprocess.run(
        [BIN / "vitest", "run", "--reporter", "verbose"],
        cwd=WORKERS, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "5 passed" in output, output[-2000:]


def test_vitest_replays_recordings_and_meets_faults_through_extra_headers(tmp_path):
    """The suite docs/testing-workers.md shows: env.AI answered from workers/test/recordings by a replaying server
    (a miss fails), and the platform's errors asked for through the binding's extraHeaders."""
    args = ("--replay", str(WORKERS / "test" / "recordings"), "--ctx-size", "256", "--parallel", "1")
    with ServerProcess(tmp_path / "replay.log", *args) as replaying:
        env = node_env(tmp_path) | {"WORKERS_AI_LOCAL": replaying.url}
        run = subprocess.run(
            [BIN / "vitest", "run", "-c", "vitest.replay.config.mts", "--reporter", "verbose"],
            cwd=WORKERS, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        completed = metric(httpx.get(replaying.url + "/metrics").text, "workers_ai_completion_tokens_total")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "5 passed" in output, output[-2000:]
    assert completed == 0  # every answer came from a recording or a fault
