"""Server-Sent Events as Workers AI sends them, and cancellation when a client goes away."""

from __future__ import annotations

import json
import re
import time

import httpx
from conftest import run_url
from test_contract import assert_ok, counts


def stream_events(client: httpx.Client, body: dict, path: str | None = None) -> list[str]:
    """The raw `data:` payloads of one streamed answer, checking the framing on the way."""
    with client.stream("POST", path or run_url(), json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), raw
    return [frame.removeprefix("data: ") for frame in frames]


def test_stream_shape(client):
    payloads = stream_events(client, {"prompt": "Say hello.", "max_tokens": 8, "temperature": 0})
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    *pieces, final = events
    assert pieces, "no text events"
    for event in pieces:
        assert set(event) == {"response", "p"}
        assert event["response"]
    assert final["response"] == ""
    usage = final["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 8
    # The padding hides token lengths, so its length must vary.
    assert len({len(event["p"]) for event in events}) > 1


def concatenated(client: httpx.Client, body: dict) -> tuple[str, dict]:
    events = [json.loads(p) for p in stream_events(client, body)[:-1]]
    return "".join(e["response"] for e in events), events[-1]["usage"]


def test_stream_equals_non_stream_at_temperature_zero(client):
    for body in (
        {"prompt": "Write two sentences about the sea.", "max_tokens": 48, "temperature": 0},
        {"messages": [{"role": "user", "content": "List three fruits."}], "max_tokens": 48, "temperature": 0},
    ):
        text, usage = concatenated(client, body)
        whole = assert_ok(client.post(run_url(), json=body))
        assert text == whole["response"]
        assert counts(usage) == counts(whole["usage"])


def test_multibyte_characters_are_never_split(client):
    # Byte-level BPE spells many CJK characters and every emoji as several tokens of partial UTF-8.
    for prompt in ("日本語の文章を書きます。東京は日本の首都です。", "🍕🍕🍕🍕🍕🍕 🌍🌍🌍"):
        body = {"prompt": prompt, "raw": True, "max_tokens": 25, "temperature": 0}
        events = [json.loads(p) for p in stream_events(client, body)[:-1]]
        assert all("\ufffd" not in e["response"] for e in events)
        text = "".join(e["response"] for e in events)
        assert any(ord(ch) > 0x2FFF for ch in text), text
        assert text == assert_ok(client.post(run_url(), json=body))["response"]


def log_line(server, path: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.log().splitlines()
        lines = [line for line in log if f" {path} " in line and "workers_ai_local.access" in line]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {path}:\n{server.log()[-3000:]}")


def completion_tokens(line: str) -> int:
    match = re.search(r"completion_tokens=(\d+)", line)
    assert match, line
    return int(match.group(1))


def test_request_log_line(server, client):
    path = run_url(account="log-line-check")
    client.post(path, json={"prompt": "Say hi.", "max_tokens": 3})
    line = log_line(server, path)
    logged = re.search(
        rf"POST {re.escape(path)} 200 prompt_tokens=\d+ cached_tokens=\d+ completion_tokens=(?P<n>[0-3])"
        r"(?P<gap> longest_token_gap=\d+\.\d{3}s)? \d+\.\d+s$",
        line,
    )
    assert logged, line
    # Every step after the first token (the one that ends the answer too) is a wait the line tells.
    assert bool(logged["gap"]) == (logged["n"] != "0"), line


def test_server_serves_after_cancellations(client):
    assert assert_ok(client.post(run_url(), json={"prompt": "Say hi.", "max_tokens": 3}))["response"]
