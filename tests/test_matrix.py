"""The behaviours every API surface shares, written once and run on each (see surfaces.py): auth, defaults,
determinism, seeds, stream framing, usage and cached tokens, finish reasons, stop sequences, cancellation on
disconnect, a full queue, an oversize body and bad input, each answered in the surface's own shapes."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from conftest import GUARD_TOKEN, ServerProcess, metric, wait_for, wait_idle
from surfaces import SURFACES, OpenAI, Surface
from test_generation import COUNTING, STORY

WEATHER = {
    "name": "getWeather",
    "description": "Get the current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
}
SYSTEM = "You are a meticulous assistant who answers briefly and precisely. " * 12
LONG_COUNT = {"prompt": COUNTING, "raw": True, "temperature": 0, "max_tokens": 900}


def over(predicate: object = None) -> pytest.MarkDecorator:
    surfaces = [s for s in SURFACES if predicate is None or predicate(s)]  # type: ignore[operator]
    return pytest.mark.parametrize("surface", surfaces, ids=str)


@over()
def test_auth_is_refused_without_a_token_and_accepted_with_one(guarded: ServerProcess, surface: Surface):
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        before = http.get("/metrics", headers={"authorization": f"Bearer {GUARD_TOKEN}"}).text
        body = {"prompt": "Say hi.", "max_tokens": 2}
        assert surface.error(surface.post(http, body), 401)
        assert surface.error(surface.post(http, body, token="not-the-token"), 403)
        assert surface.error(surface.post(http, body, token=GUARD_TOKEN[:-1]), 403)
        after = http.get("/metrics", headers={"authorization": f"Bearer {GUARD_TOKEN}"}).text
        # Refused before any model work: not one prompt token was counted.
        assert metric(after, "workers_ai_prompt_tokens_total") == metric(before, "workers_ai_prompt_tokens_total")
        reply = surface.complete(http, body, token=GUARD_TOKEN)
        assert 1 <= reply.usage["completion_tokens"] <= 2


@over()
def test_default_max_tokens_is_256(client: httpx.Client, surface: Surface):
    reply = surface.complete(client, {"prompt": COUNTING, "raw": True, "temperature": 0})
    assert reply.usage["completion_tokens"] == 256
    assert reply.finish_reason == "length"


@over()
def test_default_temperature(client: httpx.Client, surface: Surface):
    # Workers AI's own surfaces default to 0.6, OpenAI's to 1.0: the same seed gives the same text at the default
    # and a different one at the other surface's default.
    expected = {"openai": 1.0}.get(surface.name.split("-")[0], 0.6)
    body = {"prompt": STORY, "raw": True, "seed": 77, "max_tokens": 24}
    implicit = surface.complete(client, body).text
    assert implicit == surface.complete(client, {**body, "temperature": expected}).text
    assert implicit != surface.complete(client, {**body, "temperature": 1.6 - expected}).text


@over()
def test_greedy_is_deterministic_and_the_stream_says_the_same(client: httpx.Client, surface: Surface):
    body = {"messages": [{"role": "user", "content": "List three fruits."}], "temperature": 0, "max_tokens": 24}
    first = surface.complete(client, body)
    assert first.text and surface.complete(client, body).text == first.text
    streamed = surface.stream(client, body)
    assert streamed.text == first.text
    assert streamed.usage["completion_tokens"] == first.usage["completion_tokens"]
    assert streamed.usage["prompt_tokens"] == first.usage["prompt_tokens"]
    assert streamed.finish_reason == first.finish_reason


@over()
def test_seeds(client: httpx.Client, surface: Surface):
    body = {"prompt": STORY, "raw": True, "temperature": 1.2, "max_tokens": 24}
    same = {surface.complete(client, {**body, "seed": 9999999999}).text for _ in range(2)}
    assert len(same) == 1
    assert len({surface.complete(client, {**body, "seed": seed}).text for seed in (1, 2, 3)}) >= 2


@over()
def test_usage_adds_up_and_a_repeat_reports_cached_tokens(client: httpx.Client, surface: Surface):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Greet {surface.name}."}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 4}
    first = surface.complete(client, body)
    for reply in (first, surface.complete(client, body), surface.stream(client, body)):
        usage = reply.usage
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens"] > 100
    again = surface.stream(client, body)
    assert again.usage["prompt_tokens_details"]["cached_tokens"] >= 100


@over()
def test_finish_reasons(client: httpx.Client, surface: Surface):
    length = surface.complete(client, {"prompt": STORY, "raw": True, "temperature": 0, "max_tokens": 3})
    assert (length.finish_reason, length.usage["completion_tokens"]) == ("length", 3)
    streamed = surface.stream(client, {"prompt": STORY, "raw": True, "temperature": 0, "max_tokens": 3})
    assert streamed.finish_reason == "length"
    stop = surface.complete(client, {"prompt": "Say hi.", "temperature": 0, "max_tokens": 200})
    assert stop.finish_reason == "stop" and stop.usage["completion_tokens"] < 200
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    for reply in (
        surface.complete(client, {"messages": question, "tools": [WEATHER], "temperature": 0, "max_tokens": 64}),
        surface.stream(client, {"messages": question, "tools": [WEATHER], "temperature": 0, "max_tokens": 64}),
    ):
        assert reply.finish_reason == "tool_calls"
        assert reply.tool_calls[0]["name"] == "getWeather"
        assert isinstance(reply.tool_calls[0]["arguments"]["city"], str)


@over(lambda s: s.has_stop_sequences)
def test_stop_sequences_cut_the_exact_text(client: httpx.Client, surface: Surface):
    raw = {"prompt": "1, 2, 3,", "raw": True, "temperature": 0, "max_tokens": 20, "stop": [" 7"]}
    for reply in (surface.complete(client, raw), surface.stream(client, raw)):
        assert (reply.text, reply.finish_reason) == (" 4, 5, 6,", "stop")
    free = surface.complete(client, {**raw, "stop": None})
    # Without the stop sequence the same text goes on past it: the cut is the server's, not the model's.
    assert free.text.startswith(" 4, 5, 6, 7")


def completion_tokens(http: httpx.Client) -> float:
    return metric(http.get("/metrics").text, "workers_ai_completion_tokens_total")


def prompt_tokens(http: httpx.Client) -> float:
    return metric(http.get("/metrics").text, "workers_ai_prompt_tokens_total")


def wait_until_counted(http: httpx.Client, prompt_tokens_before: float, timeout: float = 5.0) -> None:
    """A request is counted when its handling ends, which for a dropped one is just after its slot frees; only
    run requests add prompt tokens, so that counter moving says this one was counted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prompt_tokens(http) > prompt_tokens_before:
            return
        time.sleep(0.05)
    raise AssertionError("the request was never counted")


@over()
def test_leaving_a_stream_cancels_its_generation(server: ServerProcess, client: httpx.Client, surface: Surface):
    wait_idle(client, timeout=30)
    tokens, counted = completion_tokens(client), prompt_tokens(client)
    with httpx.Client(base_url=server.url, timeout=60) as own, surface.open_stream(own, LONG_COUNT) as response:
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("data: ")
    wait_idle(client, timeout=5)
    wait_until_counted(client, counted)
    assert 1 <= completion_tokens(client) - tokens < 600


@over()
def test_leaving_a_plain_request_cancels_its_generation(server: ServerProcess, client: httpx.Client, surface: Surface):
    wait_idle(client, timeout=30)
    tokens, counted = completion_tokens(client), prompt_tokens(client)
    path, headers, payload = surface.request(LONG_COUNT)
    request = client.build_request("POST", server.url + path, json=payload, headers=headers)
    head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST {request.url.raw_path.decode()} HTTP/1.1\r\n{head}\r\n".encode() + request.read())
        deadline = time.monotonic() + 10
        while client.get("/health").json()["slots_busy"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1)  # let it generate a little before hanging up
    wait_idle(client, timeout=5)
    wait_until_counted(client, counted)
    assert 1 <= completion_tokens(client) - tokens < 600
    assert metric(client.get("/metrics").text, "workers_ai_requests_total", '{status="499"}') >= 1


def hold_a_slot(url: str, opened: threading.Event, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=60) as http, SURFACES[0].open_stream(http, LONG_COUNT) as response:
        opened.set()
        for _ in response.iter_bytes():
            if stop.is_set():
                return


@over()
def test_a_full_queue_answers_429_at_once(tight: ServerProcess, surface: Surface):
    stop = threading.Event()
    running, waiting = threading.Event(), threading.Event()
    holders = [threading.Thread(target=hold_a_slot, args=(tight.url, event, stop)) for event in (running, waiting)]
    try:
        holders[0].start()
        wait_for(tight.url, "slots_busy", 1)
        holders[1].start()
        wait_for(tight.url, "queue_depth", 1)
        with httpx.Client(base_url=tight.url, timeout=30) as http:
            started = time.monotonic()
            message = surface.error(surface.post(http, {"prompt": "Say hi.", "max_tokens": 2}), 429)
            assert time.monotonic() - started < 2
        assert "Capacity temporarily exceeded" in message
    finally:
        stop.set()
        for holder in holders:
            holder.join(30)
    wait_for(tight.url, "queue_depth", 0)
    wait_for(tight.url, "slots_busy", 0)


@over()
def test_reject_if_busy_fails_at_once_where_the_request_would_wait(tight: ServerProcess, surface: Surface):
    body = {"prompt": "Say hi.", "max_tokens": 2}
    path, headers, payload = surface.request(body)
    rejecting = surface.with_options(payload, {"rejectIfBusy": True})
    stop, running = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_a_slot, args=(tight.url, running, stop))
    with httpx.Client(base_url=tight.url, timeout=30) as http:
        try:
            holder.start()
            wait_for(tight.url, "slots_busy", 1)  # the one slot is taken, nothing waits: a request would queue
            started = time.monotonic()
            response = http.post(path, json=rejecting, headers=headers)
            assert time.monotonic() - started < 2
            assert surface.error(response, 429) == "Capacity temporarily exceeded, please try again."
            if isinstance(surface, OpenAI):
                assert response.json()["error"]["code"] == "3040"
                top_level = http.post(path, json={**payload, "rejectIfBusy": True}, headers=headers)
                assert surface.error(top_level, 429) == "Capacity temporarily exceeded, please try again."
            else:
                assert response.json()["errors"][0]["code"] == 3040
            assert tight.log().count("rejected at once (rejectIfBusy): all 1 slots are taken") >= 1
            assert httpx.get(tight.url + "/health").json()["queue_depth"] == 0  # it never queued
            bad = http.post(path, json=surface.with_options(payload, {"rejectIfBusy": "yes"}), headers=headers)
            assert "rejectIfBusy' must be a boolean" in surface.error(bad, 400)
        finally:
            stop.set()
            holder.join(30)
        wait_for(tight.url, "slots_busy", 0)
        # A free slot: the same request runs.
        response = http.post(path, json=rejecting, headers=headers)
        assert response.status_code == 200, response.text


@over()
def test_an_oversize_body_gets_413_declared_or_chunked(guarded: ServerProcess, surface: Surface):
    path, headers, payload = surface.request({"prompt": "x" * (guarded.max_body_bytes + 1)}, GUARD_TOKEN)
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        assert surface.error(http.post(path, json=payload, headers=headers), 413)
        data = httpx.Request("POST", "/", json=payload).read()
        chunks = (data[i : i + 4096] for i in range(0, len(data), 4096))  # no Content-Length: chunked
        chunked = http.post(path, content=chunks, headers={**headers, "content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert surface.error(chunked, 413)


@over()
def test_bad_input_is_refused_in_the_surfaces_own_shape(client: httpx.Client, surface: Surface):
    message = surface.error(surface.post(client, {"prompt": "Say hi.", "temperature": 9}), 400)
    assert "temperature" in message
