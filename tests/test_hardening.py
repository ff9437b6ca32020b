"""Transport, log and browser hardening, over raw sockets and HTTP against real servers: JSON depth, a client gone
mid-body, header size/count/time limits, shutdown with clients that never finish, the request log's escaping and
redaction, and the Host and Origin checks. (Fine-tune asset checks are in test_lora.py.)"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ServerProcess, run_url
from test_contract import assert_error, assert_ok

SMALL = {"prompt": "hi", "max_tokens": 1}
DEEP = "[" * 100_000 + "]" * 100_000
MAX_DEPTH = 128
ALLOWED_ORIGIN = "http://app.example:3000"
WEIGHTS = "adapter_model.safetensors"


def raw_exchange(port: int, data: bytes, timeout: float = 20) -> tuple[int | None, bytes]:
    """Send `data` on a fresh connection; the status of the answer (None if the connection closed without one)
    and its bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may close before all is sent; its answer is still there to read
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, answer


def envelope(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def log_after(server: ServerProcess, mark: int, needle: str, timeout: float = 10) -> str:
    """The server's log past byte `mark`, once it contains `needle`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log()[mark:]
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged:\n{server.log()[mark:]}")


# JSON depth


def test_deep_json_is_a_400_in_each_routes_shape(client):
    assert_error(client.post(run_url(), content=DEEP), 400, 5006, "100000 levels deep", f"limit is {MAX_DEPTH}")
    headers = {"cf-consn-model-id": MODEL}
    assert_error(client.post("/run?version=3", content=DEEP, headers=headers), 400, 5006, "levels deep")
    for path in ("/v1/chat/completions", "/client/v4/accounts/acc/ai/v1/completions"):
        response = client.post(path, content=DEEP)
        assert response.status_code == 400, response.text
        error = response.json()["error"]  # OpenAI's shape, not the envelope
        assert error["type"] == "invalid_request_error" and "levels deep" in error["message"]


def test_depth_limit_is_exact(client):
    def nested(levels: int) -> dict:
        inner: object = "x"
        for _ in range(levels - 3):  # the body, the messages array and the message are three levels
            inner = [inner]
        return {"messages": [{"role": "user", "content": "hi", "extra": inner}], "max_tokens": 1}

    over = client.post(run_url(), json=nested(MAX_DEPTH + 1))
    assert_error(over, 400, 5006, f"{MAX_DEPTH + 1} levels deep")
    # At the limit the body is read; whatever the schema says of it, the depth is not what it refuses.
    assert "levels deep" not in client.post(run_url(), json=nested(MAX_DEPTH)).text


# A client gone mid-body


def test_client_gone_mid_body_is_logged_once_as_499(server):
    mark = len(server.log())
    path = run_url(account="gone-mid-body")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{".encode())
        time.sleep(0.2)
    text = log_after(server, mark, f"POST {path} 499")
    assert httpx.get(f"{server.url}/health").status_code == 200
    text = server.log()[mark:]
    assert text.count(path) == 1 and "Traceback" not in text and "ClientDisconnect" not in text, text


# Header limits (the shared server runs with the defaults: 32 KiB, 100 headers)


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * 40_000 + b"\r\n",  # over the byte limit
        b"X-Huge: " + b"a" * 4_000_000 + b"\r\n",  # far over it: refused before it is all read
        b"".join(b"X-%d: 1\r\n" % i for i in range(101)),  # over the count limit
        b"".join(b"X-%d: 1\r\n" % i for i in range(100_000)),
    ],
    ids=["40KB", "4MB", "101-headers", "100000-headers"],
)
def test_oversized_heads_get_431(server, head):
    started = time.monotonic()
    status, answer = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"\r\n")
    assert status == 431, answer[:300]
    assert envelope(answer)["errors"][0]["code"] == 3006 and b"connection: close" in answer
    assert time.monotonic() - started < 10
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_heads_within_the_limits_are_served(client):
    headers = {f"x-h{i}": "1" for i in range(90)} | {"x-long": "a" * 20_000}
    assert client.get("/health", headers=headers).status_code == 200


# The request log


def test_log_escapes_control_characters(server, client):
    mark = len(server.log())
    client.get("/inject%0d%0a2026-01-01 INFO forged: line%00%1b[31m")
    text = log_after(server, mark, "/inject")
    line = next(line for line in text.splitlines() if "/inject" in line)
    assert "/inject\\x0d\\x0a2026-01-01 INFO forged: line\\x00\\x1b[31m 404" in line, line
    assert not any(line.startswith("2026-01-01 INFO forged") for line in text.splitlines())
    assert "\x00" not in text and "\x1b" not in text


def test_log_never_holds_a_binding_token(server, client):
    mark = len(server.log())
    token = "s3cret-binding-token"
    client.get(f"/binding/{token}")  # not unwrapped: a GET
    client.post(f"/binding/{token}", json={"inputs": SMALL})  # not unwrapped: no MF-URL
    client.post(f"/binding/{token}/deeper%0a", json={})
    client.get(f"/binding/{token}", headers={"MF-URL": "https://workers-binding.ai/ai-api/models/search"})
    text = log_after(server, mark, "/ai-api/models/search")
    assert token not in text, text
    assert text.count("/binding/<redacted>") == 3, text


# Browser safety (the shared server is bound to loopback, with no --allowed-hosts and no --cors-origins)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8787", "127.0.0.1.evil.example", "localhost.evil"])
def test_foreign_host_names_are_refused(client, host):
    headers = {"host": host}
    assert_error(client.post(run_url(), json=SMALL, headers=headers), 403, 10000, "Host", "--allowed-hosts")
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == 403 and "--allowed-hosts" in response.json()["error"]["message"]


def test_a_rebound_page_cannot_create_a_finetune(client, lora_dir):
    before = set((lora_dir / "finetunes").glob("*")) if (lora_dir / "finetunes").exists() else set()
    body = {"model": MODEL, "name": "rebound"}
    rebound = {"host": "evil.example:8787", "origin": "http://evil.example:8787"}
    assert_error(client.post("/client/v4/accounts/a/ai/finetunes", json=body, headers=rebound), 403, 10000)
    cross_site = {"origin": "http://evil.example", "content-type": "application/x-www-form-urlencoded"}
    assert_error(client.post("/client/v4/accounts/a/ai/finetunes", json=body, headers=cross_site), 403, 10000)
    after = set((lora_dir / "finetunes").glob("*")) if (lora_dir / "finetunes").exists() else set()
    assert after == before


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "app.localhost"])
def test_loopback_host_names_are_served(server, host):
    headers = {"host": f"{host}:{server.port}"}
    assert httpx.get(f"{server.url}/health", headers=headers).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:1"])
def test_foreign_origins_are_refused_before_any_work(server, client, origin):
    mark = len(server.log())
    response = client.post(run_url(), json=SMALL, headers={"origin": origin, "content-type": "text/plain"})
    assert_error(response, 403, 10000, "Origin", "--cors-origins")
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}, headers={"origin": origin})
    assert chat.status_code == 403 and chat.json()["error"]["type"] == "invalid_request_error"
    text = log_after(server, mark, "/v1/chat/completions 403")
    assert "prompt_tokens" not in text  # refused before a generation existed


def test_same_origin_and_curl_forms_still_run(server, client):
    # The playground page calls the API from the server's own origin.
    own = {"origin": server.url}
    assert_ok(client.post(run_url(), json=SMALL, headers=own))
    # The seed's curl forms: no content type, and `curl -d`'s form type; no Origin.
    body = json.dumps(SMALL).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(
            f"POST {run_url()} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    form = client.post(run_url(), content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert_ok(form)


# A server with its own settings: short header timeout, an extra host name, a CORS origin, a small asset limit


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tuned")
    proc = ServerProcess(
        folder / "server.log", "--header-timeout", "1", "--allowed-hosts", "api.example,*.corp.example",
        "--cors-origins", ALLOWED_ORIGIN, "--max-asset-bytes", "1000000", "--lora-dir", str(folder / "lora"),
        "--ctx-size", "512", "--parallel", "1",
    )  # fmt: skip
    with proc:
        yield proc


def test_slow_and_idle_heads_time_out(tuned):
    for data in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "):
        started = time.monotonic()
        status, answer = raw_exchange(tuned.port, data, timeout=15)
        assert status == 408, answer
        assert 0.9 < time.monotonic() - started < 8
        assert envelope(answer)["errors"][0]["code"] == 3006


def test_a_slow_body_is_not_a_slow_head(tuned):
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", tuned.port), timeout=60) as sock:
        sock.sendall(
            f"POST {run_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:5]
        )
        time.sleep(1.5)  # past the header timeout, in the body
        sock.sendall(body[5:])
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_allowed_hosts_and_cors_origins(tuned):
    for host in ("api.example", "api.example:443", "x.corp.example"):
        assert httpx.get(f"{tuned.url}/health", headers={"host": host}).status_code == 200
    assert httpx.get(f"{tuned.url}/health", headers={"host": "corp.example.evil"}).status_code == 403
    run = f"{tuned.url}{run_url()}"
    allowed = httpx.post(run, json=SMALL, headers={"origin": ALLOWED_ORIGIN}, timeout=60)
    assert_ok(allowed)
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = httpx.options(
        run,
        headers={"origin": ALLOWED_ORIGIN, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"},
    )  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert httpx.post(run, json=SMALL, headers={"origin": "http://other.example"}).status_code == 403


def test_chunked_asset_upload_past_the_limit_is_refused_and_not_kept(tuned):
    finetunes = f"{tuned.url}/client/v4/accounts/a/ai/finetunes"
    assert_ok(httpx.post(finetunes, json={"model": MODEL, "name": "big"}))

    def body() -> Iterator[bytes]:
        yield (
            b'--b\r\nContent-Disposition: form-data; name="file_name"\r\n\r\nadapter_model.safetensors\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        )
        for _ in range(200):  # 20 MB, no Content-Length: chunked
            yield bytes(100_000)
        yield b"\r\n--b--\r\n"

    def refused(**request: object) -> None:
        try:
            response = httpx.post(f"{finetunes}/big/finetune-assets", timeout=60, **request)  # type: ignore[arg-type]
        except httpx.WriteError:
            return  # the server answered and closed while the body was still being sent
        assert_error(response, 413, 3006, "1000000 bytes")

    refused(content=body(), headers={"content-type": "multipart/form-data; boundary=b"})  # no Content-Length
    refused(files={"file": ("a", bytes(2_000_000))}, data={"file_name": WEIGHTS})  # declared
    stored = [p for p in (Path(tuned.log_path).parent / "lora").rglob("*") if p.is_file()]
    assert [p.name for p in stored] == ["finetune.json"], stored
    assert httpx.get(f"{tuned.url}/health").status_code == 200


# Shutdown


def test_shutdown_is_bounded_with_clients_that_never_finish(tmp_path):
    proc = ServerProcess(tmp_path / "server.log", "--shutdown-timeout", "1", "--ctx-size", "1024", "--parallel", "2")
    with proc:
        # A stream its client never reads (a tiny receive buffer, soon full), and a body never finished.
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        reader.connect(("127.0.0.1", proc.port))
        payload = json.dumps({"prompt": "1, 2, 3,", "raw": True, "stream": True, "max_tokens": 1000}).encode()
        reader.sendall(
            f"POST {run_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        half = socket.create_connection(("127.0.0.1", proc.port))
        half.sendall(f"POST {run_url()} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{{".encode())
        deadline = time.monotonic() + 30
        while httpx.get(f"{proc.url}/health").json()["slots_busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.process.send_signal(signal.SIGTERM)
        # Without the bound the process waits for these clients for ever. With it, the requests are cancelled
        # after 1 s; the engine then finishes its current step, which takes seconds on a loaded machine.
        try:
            proc.process.wait(timeout=60)
        finally:
            reader.close()
            half.close()
        log = proc.log()
        assert "timeout graceful shutdown exceeded" in log and "Traceback" not in log, log
        assert f"POST {run_url()} 503" in log  # the body never finished: answered as the server stops
