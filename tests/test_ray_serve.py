"""The API through Ray Serve: `python -m workers_ai_local.ray_serve` with 2 replicas of the embedded model (1 thread
each) on a throwaway local cluster, driven as a user would: every surface, both official SDKs, a seed Worker in real
workerd, session and prefix affinity, the cluster's /health and /metrics, a full queue, and a replica killed mid-answer.

Ray is an extra (`make test` installs it); without it this module is skipped, saying so.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, PROJECT_ROOT, ServerProcess
from surfaces import Surface
from test_generation import COUNTING
from test_matrix import WEATHER, over
from test_workers import _skip_reason, bundle, miniflare  # noqa: F401 (bundle: the fixture, shared)

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]' (make test does)")

import cloudflare
import openai

ACCOUNT = "0123456789abcdef0123456789abcdef"
REPLICAS = 2
PARALLEL = 2
QUEUE = 2  # requests the deployment holds beyond its replicas' slots before answering 429
REPLICA = "x-wai-replica"
TOKEN = "ray-token"  # the cluster wants an API token: the proxy's own /metrics must ask for it too
AUTH = {"authorization": f"Bearer {TOKEN}"}


def wait_replicas_ready(url: str, count: int, timeout: float, *, exclude: frozenset[str] = frozenset()) -> dict:
    deadline = time.monotonic() + timeout
    health: dict = {}
    while time.monotonic() < deadline:
        try:
            health = httpx.get(url + "/health", timeout=5).json()
            replicas = health.get("replicas", {})
            fresh = [rid for rid, r in replicas.items() if r.get("status") == "ready" and rid not in exclude]
            if len(fresh) >= count and health["replicas_ready"] == len(replicas):
                return health
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"{count} replicas never became ready: {health}")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("ray") / "server.log"
    proc = ServerProcess(
        log, "--replicas", str(REPLICAS), "--threads", "1", "--parallel", str(PARALLEL), "--max-queue", str(QUEUE),
        "--ctx-size", "1024", "--kv-layout", "slots", "--health-period", "1", "--api-token", TOKEN,
        module="workers_ai_local.ray_serve",
    )  # fmt: skip
    with proc:
        wait_replicas_ready(proc.url, REPLICAS, timeout=120)
        yield proc


@pytest.fixture(scope="module")
def http(ray_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_server.url, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def bare(ray_server: ServerProcess) -> Iterator[httpx.Client]:
    """No credentials: the surfaces send the token their own way (or none)."""
    with httpx.Client(base_url=ray_server.url, timeout=120) as client:
        yield client


# -- every surface, as on one server ------------------------------------------------------------------------------


@over()
def test_each_surface_answers_and_streams_the_same(bare: httpx.Client, surface: Surface):
    body = {"messages": [{"role": "user", "content": "List three fruits."}], "temperature": 0, "max_tokens": 16}
    whole = surface.complete(bare, body, TOKEN)
    # Without a session the two requests may reach different replicas: the same model answers alike.
    streamed = surface.stream(bare, body, TOKEN)
    assert whole.text and streamed.text == whole.text
    assert streamed.usage["completion_tokens"] == whole.usage["completion_tokens"]


@over()
def test_each_surface_gives_tool_calls_and_its_own_errors(bare: httpx.Client, surface: Surface):
    asked = {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER]}
    reply = surface.complete(bare, {**asked, "temperature": 0, "max_tokens": 60}, TOKEN)
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "getWeather"
    assert "temperature" in surface.error(surface.post(bare, {"prompt": "x", "temperature": 9}, TOKEN), 400)
    assert surface.error(surface.post(bare, {"prompt": "x"}), 401)


def test_the_cloudflare_sdk(ray_server: ServerProcess):
    with cloudflare.Cloudflare(api_token=TOKEN, base_url=f"{ray_server.url}/client/v4", max_retries=0) as cf:
        result = cf.ai.run(MODEL, account_id=ACCOUNT, prompt="Say hi.", max_tokens=6, temperature=0)
        assert result["response"] and 1 <= result["usage"]["completion_tokens"] <= 6
        with cf.ai.with_streaming_response.run(
            MODEL, account_id=ACCOUNT, prompt="Say hi.", max_tokens=6, temperature=0, stream=True
        ) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(line[6:])["response"] for line in lines[:-1]) == result["response"]
        with pytest.raises(cloudflare.BadRequestError):
            cf.ai.run(MODEL, account_id=ACCOUNT, prompt="x", temperature=9)


def test_the_openai_sdk(ray_server: ServerProcess):
    with openai.OpenAI(api_key=TOKEN, base_url=f"{ray_server.url}/v1", max_retries=0) as oai:
        messages = [{"role": "user", "content": "Name a color."}]
        whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        chunks = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model=MODEL, messages=messages, temperature=9)


def test_a_seed_worker_in_workerd(ray_server: ServerProcess, bundle: Path, tmp_path: Path):  # noqa: F811
    if _skip_reason():
        pytest.skip(str(_skip_reason()))
    host = miniflare(bundle, f"{ray_server.url}/binding/{TOKEN}", tmp_path / "miniflare")
    try:
        answer = httpx.get(host.url + "/seed/worker", timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"]
    finally:
        host.stop()


# -- routing -------------------------------------------------------------------------------------------------------


def test_without_a_session_a_conversation_follows_its_cached_prefix(http: httpx.Client):
    """Two conversations interleaved, no session header: each turn goes where the conversation's earlier turns are
    cached, told apart by the proxy's prompt-prefix keys. (Before the session test: a session claims a slot, and
    with two slots a replica would then keep one of these conversations' caches only.)"""
    conversations = {
        name: [{"role": "system", "content": f"You are {name}, who answers briefly. " * 8}] for name in ("Ada", "Bo")
    }
    seen: dict[str, set[str]] = {name: set() for name in conversations}
    cached: dict[str, list[int]] = {name: [] for name in conversations}
    for turn in range(3):
        for name, messages in conversations.items():
            messages.append({"role": "user", "content": f"Question {turn}: what is {turn} plus {turn}?"})
            answer = http.post(f"/ai/run/{MODEL}", json={"messages": messages, "max_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            seen[name].add(answer.headers[REPLICA])
            result = answer.json()["result"]
            cached[name].append(result["usage"]["prompt_tokens_details"]["cached_tokens"])
            messages.append({"role": "assistant", "content": result["response"]})
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert all(c[1] > 0 and c[2] > c[1] for c in cached.values()), cached


def test_a_session_stays_on_one_replica_and_its_cache_grows(http: httpx.Client):
    url = f"/ai/run/{MODEL}"
    messages = [{"role": "system", "content": "You answer in one short sentence."}]
    replicas, cached, prompts = set(), [], []
    for turn in range(10):
        messages.append({"role": "user", "content": f"Give me fact number {turn + 1} about the sea."})
        answer = http.post(url, json={"messages": messages, "max_tokens": 12, "temperature": 0},
                           headers={"x-session-affinity": "sea-facts"})  # fmt: skip
        assert answer.status_code == 200, answer.text
        replicas.add(answer.headers[REPLICA])
        result = answer.json()["result"]
        cached.append(result["usage"]["prompt_tokens_details"]["cached_tokens"])
        prompts.append(result["usage"]["prompt_tokens"])
        messages.append({"role": "assistant", "content": result["response"]})
    assert len(replicas) == 1, replicas
    # Each turn reuses the whole of the previous turn's prompt but its last partial block (64 tokens).
    assert cached[0] == 0 and all(cached[n] >= prompts[n - 1] - 64 for n in range(1, 10)), (cached, prompts)
    assert all(later >= earlier for earlier, later in itertools.pairwise(cached)) and cached[-1] >= 256, cached


# -- the cluster's own answers -------------------------------------------------------------------------------------


def test_health_and_metrics_cover_every_replica(http: httpx.Client, bare: httpx.Client):
    health = http.get("/health").json()
    assert health["status"] == "ready" and health["replicas_ready"] == REPLICAS == len(health["replicas"])
    assert all(r["slots"] == PARALLEL and r["pid"] > 0 for r in health["replicas"].values())
    text = http.get("/metrics").text
    labelled = set(re.findall(r'^workers_ai_requests_total\{.*replica="([^"]+)".*\} ', text, re.MULTILINE))
    assert labelled == set(health["replicas"])
    assert text.count("# TYPE workers_ai_requests_total ") == 1
    refused = bare.get("/metrics")
    assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == 10000
    assert bare.get("/health").status_code == 200  # open, as on one server


@pytest.mark.parametrize("path", [f"/ai/run/{MODEL}", "/v1/completions"])
def test_a_full_cluster_answers_429_in_the_routes_own_shape(http: httpx.Client, ray_server: ServerProcess, path: str):
    body = {"prompt": "Count slowly from one to one hundred.", "max_tokens": 120, "temperature": 0, "model": MODEL}
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        response = httpx.post(ray_server.url + path, json=body, headers=AUTH, timeout=120)
        with lock:
            answers.append(response)

    senders = [threading.Thread(target=send) for _ in range(REPLICAS * PARALLEL + QUEUE + 4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    refused = [a for a in answers if a.status_code == 429]
    assert refused and len(refused) < len(answers), [a.status_code for a in answers]
    assert all(a.status_code == 200 for a in answers if a not in refused)
    for answer in refused:
        assert answer.headers["content-type"] == "application/json" and answer.headers["retry-after"] == "1"
        if path.startswith("/v1"):
            assert answer.json()["error"]["code"] == "3040" and answer.json()["error"]["type"] == "rate_limit_error"
        else:
            assert answer.json()["errors"] == [
                {"code": 3040, "message": "Capacity temporarily exceeded, please try again."}
            ]


def busy_slots(url: str) -> int:
    replicas = httpx.get(url + "/health", timeout=5).json()["replicas"].values()
    return sum(int(report.get("slots_busy", 0)) for report in replicas)


def test_reject_if_busy_fails_at_once_when_every_replica_is_full(http: httpx.Client, ray_server: ServerProcess):
    long = {"prompt": COUNTING, "raw": True, "max_tokens": 900, "temperature": 0, "stream": True}
    stop = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", f"{ray_server.url}/ai/run/{MODEL}", json=long, headers=AUTH, timeout=120) as r:
            for _ in r.iter_bytes():
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold) for _ in range(REPLICAS * PARALLEL)]
    rejecting = {"prompt": "Say hi.", "max_tokens": 2, "options": {"rejectIfBusy": True}}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    try:
        for holder in holders:
            holder.start()
        deadline = time.monotonic() + 60
        while busy_slots(ray_server.url) < REPLICAS * PARALLEL and time.monotonic() < deadline:
            time.sleep(0.2)
        started = time.monotonic()
        refused = http.post(f"/ai/run/{MODEL}", json=rejecting)
        assert time.monotonic() - started < 2
        assert refused.status_code == 429, refused.text
        capacity = {"code": 3040, "message": "Capacity temporarily exceeded, please try again."}
        assert refused.json()["errors"] == [capacity]
        openai_refused = http.post("/v1/chat/completions", json={**chat, "options": {"rejectIfBusy": True}})
        assert openai_refused.status_code == 429 and openai_refused.json()["error"]["code"] == "3040"
        assert httpx.post(ray_server.url + f"/ai/run/{MODEL}", json=rejecting).status_code == 401  # auth first
    finally:
        stop.set()
        for holder in holders:
            holder.join(60)
    deadline = time.monotonic() + 60
    while busy_slots(ray_server.url) and time.monotonic() < deadline:
        time.sleep(0.2)
    accepted = http.post(f"/ai/run/{MODEL}", json=rejecting)
    assert accepted.status_code == 200, accepted.text


# -- faults (last: it replaces a replica) --------------------------------------------------------------------------


def test_a_killed_replica_ends_its_answers_cleanly_and_is_replaced(http: httpx.Client, ray_server: ServerProcess):
    session = {"x-session-affinity": "doomed"}
    # Raw counting runs until max_tokens; a chat request may be answered in a few tokens, before the kill.
    long = {"prompt": COUNTING, "raw": True, "max_tokens": 900, "temperature": 0}
    before = http.get("/health").json()["replicas"]
    whole: dict[str, httpx.Response] = {}
    url = f"{ray_server.url}/ai/run/{MODEL}"
    headers = session | AUTH
    json_request = threading.Thread(target=lambda: whole.setdefault("r", httpx.post(url, json=long, headers=headers)))
    with http.stream("POST", f"/ai/run/{MODEL}", json={**long, "stream": True}, headers=session) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: {")
        json_request.start()
        time.sleep(0.5)  # the JSON request is under way on the same replica
        doomed = stream.headers[REPLICA]
        os.kill(before[doomed]["pid"], signal.SIGKILL)
        rest = [line for line in lines if line]  # ends, never hangs (the client's timeout would fail the test)
    assert json.loads(rest[-1].removeprefix("data: "))["error"]["code"] == 3043, rest[-3:]
    json_request.join(60)
    failed = whole["r"]
    assert failed.status_code == 500 and failed.json()["errors"][0]["code"] == 3043, failed.text
    # Other requests go on at once, on the surviving replica.
    answer = http.post(f"/ai/run/{MODEL}", json={"prompt": "Say hi.", "max_tokens": 3})
    assert answer.status_code == 200 and answer.headers[REPLICA] != doomed
    health = wait_replicas_ready(ray_server.url, REPLICAS, timeout=60, exclude=frozenset({doomed}))
    assert doomed not in health["replicas"]
    # The session moves to a live replica.
    assert http.post(f"/ai/run/{MODEL}", json={"prompt": "Hi", "max_tokens": 2}, headers=session).status_code == 200


def _session_pids(leader: int) -> set[int]:
    """The processes of the server's session (it started one, and Ray's processes inherit it)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == leader:  # the session id
                pids.add(int(entry.name))
    return pids


def _listening(pids: set[int]) -> set[str]:
    """host:port of every TCP socket these processes listen on, from /proc (no `ss` needed)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # state LISTEN
                address, port = cols[1].rsplit(":", 1)
                found.add(f"{_ip(address)}:{int(port, 16)}")
    return found


def _ip(hexed: str) -> str:
    raw = bytes.fromhex(hexed)
    # /proc writes addresses as 32-bit words in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ".".join(str(b) for b in words)
    if words[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in words[12:])  # an IPv4-mapped address
    return "::1" if words == b"\0" * 15 + b"\x01" else words.hex()


def test_every_ray_process_listens_on_loopback_only(ray_server: ServerProcess):
    pids = _session_pids(ray_server.process.pid)
    assert len(pids) > 5  # the driver, GCS, raylet, controller, proxy, replicas...
    listening = _listening(pids)
    assert f"127.0.0.1:{ray_server.port}" in listening
    assert all(a.startswith("127.0.0.1:") or a.startswith("::1:") for a in listening), listening


def test_the_serve_config_file_builds_the_application_it_describes():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from workers_ai_local.ray_serve.deployment import build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load((PROJECT_ROOT / "deploy" / "ray-serve.yaml").read_text()))
    (application,) = config.applications
    assert (
        application.import_path == "workers_ai_local.ray_serve.deployment:build_app" and application.route_prefix == "/"
    )
    deployment = build_app(application.args)._bound_deployment
    assert deployment.name == application.deployments[0].name
    assert deployment.ray_actor_options == {"num_cpus": 0, "num_gpus": 1.0}
    assert deployment.max_ongoing_requests == 8  # --parallel
