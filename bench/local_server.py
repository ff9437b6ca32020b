"""This server in a child process on a free loopback port, for the benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# The stand-in models of Llama 3.1 (models/llama31_standin.py), built on first use into the tests' cache.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT / "models"))
STANDIN_CACHE = Path(os.environ.get("WAI_STANDIN_CACHE") or Path.home() / ".cache" / "workers-ai-local" / "standin")
STANDINS = {"llama31-tiny": "tiny", "llama31-8b": "llama31_8b_q4_k_m"}


def model_source(name: str) -> str:
    """A --model value: a stand-in's name becomes its built file (the 8B takes minutes the first time)."""
    if name not in STANDINS:
        return name
    import llama31_standin

    return str(getattr(llama31_standin, STANDINS[name])(STANDIN_CACHE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, timeout: float = 600, log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m workers_ai_local ARGS` once its /health answers 200 (its log in `log`, else dropped); returns the
    process and its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "workers_ai_local", "--port", str(port), *args]
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, stderr=log.open("w") if log else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready")
