"""Every test talks to a real server process over loopback HTTP, serving the embedded model."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from workers_ai_local.config import physical_cores

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL = "@cf/meta/llama-3.1-8b-instruct-fast"
# The stand-in model generator, shared with the benchmarks, and where its models are built (once, then reused).
sys.path.insert(0, str(PROJECT_ROOT / "models"))
STANDIN_CACHE = Path(os.environ.get("WAI_STANDIN_CACHE") or Path.home() / ".cache" / "workers-ai-local" / "standin")
# Small enough that the context-limit paths are cheap to reach with the embedded model.
TEST_CTX = 1024
# The token of the `guarded` server, whose body limit is also small enough to pass cheaply.
GUARD_TOKEN = "flag-token"
GUARD_BODY_LIMIT = 32768
# `make test` runs test files in parallel (pytest -n): each worker's servers get their share of the cores, since
# llama.cpp's threads spin while they wait for each other and, outnumbering the cores, took seconds a token.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


# Under -n each file runs whole on one worker (--dist loadfile), and files are handed out in the order collected:
# the longest go first, so that no worker is left alone with one of them at the end.
SLOW_FILES_FIRST = (
    "test_structured_output.py", "test_kv_pool.py", "test_openapi_contract.py", "test_ray_serve.py",
    "test_workers.py", "test_batching.py", "test_package.py", "test_models.py", "test_matrix.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m workers_ai_local` (or another entry point, such as workers_ai_local.ray_serve) in a child process
    of its own process group, its log captured to a file."""

    def __init__(
        self,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        module: str = "workers_ai_local",
        default_threads: bool = False,
    ) -> None:
        if WORKERS > 1 and not default_threads and "--threads" not in args:
            args = ("--threads", str(max(1, physical_cores() // WORKERS)), *args)
        self.port = free_port()
        self.max_body_bytes = int(args[args.index("--max-body-bytes") + 1]) if "--max-body-bytes" in args else 4 << 20
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(self.port), *args],
            cwd=PROJECT_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def __enter__(self) -> ServerProcess:
        """The server once ready; stopped when the block ends, or at once if it never becomes ready."""
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever it started and left behind (Ray's processes)
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    # The slots KV layout: many tests compare outputs across requests bit for bit (concurrent against alone, an
    # adapter of zeros against none, a reused prefix against a cold one), which only that layout promises. The
    # default pool layout has its own tests (test_kv_pool.py) and serves the other fixtures' servers.
    proc = ServerProcess(log, "--kv-layout", "slots", "--ctx-size", str(TEST_CTX), "--lora-dir", str(lora_dir))
    with proc:
        yield proc


@pytest.fixture(scope="session")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that wants API tokens (one by flag, one from a file) and takes small bodies only."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "tokens").write_text("# team tokens\nfile-token\n")
    proc = ServerProcess(
        folder / "server.log", "--api-token", GUARD_TOKEN, "--api-token-file", str(folder / "tokens"),
        "--max-body-bytes", str(GUARD_BODY_LIMIT), "--ctx-size", "512", "--parallel", "1",
    )  # fmt: skip
    with proc:
        yield proc


@pytest.fixture(scope="session")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One slot and room for one waiting request: the third concurrent request is refused."""
    log = tmp_path_factory.mktemp("tight") / "server.log"
    proc = ServerProcess(log, "--parallel", "1", "--max-queue", "1", "--ctx-size", "1024")
    with proc:
        yield proc


@pytest.fixture(scope="session")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--strict: what the hosted model refuses is refused (docs/compatibility.md)."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    with ServerProcess(log, "--strict", "--parallel", "1", "--ctx-size", "512") as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        yield http


def run_url(model: str = MODEL, account: str = "0123456789abcdef") -> str:
    return f"/client/v4/accounts/{account}/ai/run/{model}"


def metric(text: str, name: str, labels: str = "", absent: float | None = None) -> float:
    """A sample of /metrics; `absent` is its value when the series is not there yet (a label never counted)."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    if match is None and absent is not None:
        return absent
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def wait_for(url: str, key: str, value: int, timeout: float = 10) -> None:
    """Until /health's `key` reads `value`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").json()[key] == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"{key} never reached {value}: {httpx.get(url + '/health').json()}")


def wait_idle(client: httpx.Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").json()["slots_busy"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the slot is still busy: the generation was not cancelled")
