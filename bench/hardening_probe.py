"""The hostile requests of issue 28's transport, log, browser and fine-tune findings, each sent once to a fresh
server: status, seconds and the server's memory (VmRSS after, VmHWM the peak so far) per request, and what the
server logged. Run it on two builds to compare them.

    .venv/bin/python bench/hardening_probe.py [--big-upload-mb 600] [--skip-shutdown]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from local_server import start_server
from safetensors.numpy import save as save_bytes

MODEL = "@cf/meta/llama-3.1-8b-instruct-fast"
RUN = f"/client/v4/accounts/acc/ai/run/{MODEL}"
FINETUNES = "/client/v4/accounts/acc/ai/finetunes"
LAYERS, EMBED, KV_WIDTH = 30, 576, 192  # SmolLM2-135M


def memory(pid: int) -> str:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return f"rss={int(fields['VmRSS'].split()[0]) // 1024}MB peak={int(fields['VmHWM'].split()[0]) // 1024}MB"


def raw(port: int, data: bytes, read: bool = True, timeout: float = 30) -> str:
    """Send bytes on a fresh connection; the first line of the answer (or what became of the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError as exc:
            return f"send failed: {exc.__class__.__name__}"
        if not read:
            return "sent"
        try:
            answer = sock.recv(65536)
        except OSError as exc:
            return f"recv failed: {exc.__class__.__name__}"
        return answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"


def adapter(rank: int = 4, width: int = EMBED, layers: range | tuple[int, ...] = range(LAYERS)) -> bytes:
    r = rank
    tensors = {}
    for layer in layers:
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = np.zeros((r, width), np.float32)
        tensors[f"{key}.lora_B.weight"] = np.zeros((EMBED, r), np.float32)
    return save_bytes(tensors)


def upload(http: httpx.Client, name: str, file_name: str, data: bytes) -> httpx.Response:
    return http.post(
        f"{FINETUNES}/{name}/finetune-assets",
        data={"file_name": file_name},
        files={"file": (file_name, data, "application/octet-stream")},
    )


def chunked_upload(http: httpx.Client, name: str, megabytes: int) -> httpx.Response:
    boundary = "probeboundary"
    chunk = bytes(1 << 20)

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(megabytes):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        return http.post(f"{FINETUNES}/{name}/finetune-assets", content=body(), headers=headers, timeout=600)
    except httpx.TransportError as exc:
        return httpx.Response(0, text=f"transport error: {exc!r}")


def main() -> None:
    cli = argparse.ArgumentParser()
    cli.add_argument("--big-upload-mb", type=int, default=600)
    cli.add_argument("--skip-shutdown", action="store_true")
    args = cli.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="hardening-probe-"))
    log = folder / "server.log"
    proc, url = start_server("--lora-dir", str(folder / "lora"), "--parallel", "2", log=log)
    port = int(url.rsplit(":", 1)[1])
    http = httpx.Client(base_url=url, timeout=120)
    print(f"server pid {proc.pid}, log {log}; at start {memory(proc.pid)}")

    def probe(name: str, send: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            outcome = send()
        except Exception as exc:  # a connection the server cut is an outcome too
            outcome = f"{exc.__class__.__name__}: {exc}"
        took = time.perf_counter() - started
        if isinstance(outcome, httpx.Response):
            outcome = f"{outcome.status_code} {outcome.text[:110]!r}"
        print(f"{name:44s} {took:7.2f}s {memory(proc.pid)}  {outcome}")

    deep = "[" * 100_000 + "]" * 100_000
    body = {"prompt": "hi", "max_tokens": 1}
    probe("deep JSON (100k levels) on /ai/run", lambda: http.post(RUN, content=deep))
    probe("deep JSON (100k levels) on /v1/chat", lambda: http.post("/v1/chat/completions", content=deep))
    nested = json.dumps({**body, "x": json.loads("[" * 900 + "]" * 900)})
    probe("900 levels in an ignored field on /ai/run", lambda: http.post(RUN, content=nested))
    probe(
        "client gone mid-body",
        lambda: raw(port, f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{".encode(), False),
    )
    time.sleep(0.5)

    probe(
        "header of 32 MiB",
        lambda: raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 20) + b"\r\n\r\n"),
    )
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(100_000))
    probe("100,000 headers", lambda: raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n"))

    def slow_headers() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=40) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            try:
                answer = sock.recv(1024)
            except TimeoutError:
                return "no answer in 40 s (connection held open)"
            return answer.split(b"\r\n", 1)[0].decode() or "closed"

    probe("headers never finished", slow_headers)
    probe("log injection GET /a%0d%0aFAKE%00", lambda: http.get("/a%0d%0aFAKE%20LINE%00"))
    probe("GET /binding/<token>", lambda: http.get("/binding/s3cret-token"))
    probe("POST /binding/<token> without MF-URL", lambda: http.post("/binding/s3cret-token", json={}))
    probe("Host: evil.example GET /health", lambda: http.get("/health", headers={"host": "evil.example"}))
    probe(
        "Host: evil.example POST finetune",
        lambda: http.post(FINETUNES, json={"model": MODEL, "name": "rebound"}, headers={"host": "evil.example:8787"}),
    )
    probe(
        "Origin: evil POST /ai/run",
        lambda: http.post(RUN, json=body, headers={"origin": "http://evil.example", "content-type": "text/plain"}),
    )
    probe(
        "curl -d form POST /ai/run (no Origin)",
        lambda: http.post(RUN, content=json.dumps(body), headers={"content-type": "application/x-www-form-urlencoded"}),
    )

    # Fine-tunes
    config = {"model_type": "llama", "r": 4, "lora_alpha": 8}
    for label, bad in (("r 'abc'", {**config, "r": "abc"}), ("r null", {**config, "r": None}),
                       ("lora_alpha 'abc'", {**config, "lora_alpha": "abc"})):  # fmt: skip
        name = "ft-" + "".join(c for c in label if c.isalnum())
        http.post(FINETUNES, json={"model": MODEL, "name": name})
        probe(
            f"config {label}",
            lambda name=name, bad=bad: upload(http, name, "adapter_config.json", json.dumps(bad).encode()),
        )
        probe(
            f"  then weights for {label}", lambda name=name: upload(http, name, "adapter_model.safetensors", adapter())
        )
        probe(
            f"  then a correct config for {label}",
            lambda name=name: upload(http, name, "adapter_config.json", json.dumps(config).encode()),
        )
        probe(f"  then a run with {label}", lambda name=name: http.post(RUN, json={**body, "lora": name}))
    http.post(FINETUNES, json={"model": MODEL, "name": "ft-nan"})
    probe("config r NaN", lambda: upload(http, "ft-nan", "adapter_config.json", b'{"model_type": "llama", "r": NaN}'))
    for label, weights in (("rank 256 under r=4", adapter(256)), ("width 100", adapter(width=100)),
                           ("layer 9999", adapter(layers=(9999,))), ("rank 0", adapter(0))):  # fmt: skip
        name = "ft-" + "".join(c for c in label if c.isalnum())
        http.post(FINETUNES, json={"model": MODEL, "name": name})
        upload(http, name, "adapter_config.json", json.dumps(config).encode())
        probe(
            f"weights {label}",
            lambda name=name, weights=weights: upload(http, name, "adapter_model.safetensors", weights),
        )
        probe(f"  then a run with {label}", lambda name=name: http.post(RUN, json={**body, "lora": name}))
        probe(
            f"  then correct weights for {label}",
            lambda name=name: upload(http, name, "adapter_model.safetensors", adapter()),
        )
    http.post(FINETUNES, json={"model": MODEL, "name": "ft-big"})
    probe(f"chunked upload of {args.big_upload_mb} MB", lambda: chunked_upload(http, "ft-big", args.big_upload_mb))
    stored = sum(f.stat().st_size for f in (folder / "lora").rglob("adapter_model.safetensors"))
    print(f"bytes of adapter_model.safetensors under --lora-dir: {stored}")

    if not args.skip_shutdown:
        # A streamed answer the client never reads, and a body never finished; then SIGTERM.
        stream = socket.create_connection(("127.0.0.1", port))
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        payload = json.dumps({"prompt": "Count: 1, 2, 3,", "raw": True, "stream": True, "max_tokens": 4000}).encode()
        stream.sendall(
            f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(f"POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{".encode())
        time.sleep(1)
        started = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
            print(f"SIGTERM with a non-reading client: exited after {time.perf_counter() - started:.2f}s")
        except Exception:
            print("SIGTERM with a non-reading client: still running after 120 s; killed")
            proc.kill()
        stream.close()
        half.close()
    else:
        proc.terminate()
        proc.wait()
    print("---- server log (access lines and errors) ----")
    for line in log.read_text(errors="replace").splitlines():
        if "access" in line or "ERROR" in line or "Traceback" in line or "Error" in line:
            print(line[:200])


if __name__ == "__main__":
    main()
