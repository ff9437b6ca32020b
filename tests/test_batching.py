"""Continuous batching, prefix reuse, session affinity, backpressure and metrics, over HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TEST_CTX, ServerProcess, metric, run_url, wait_for, wait_idle
from test_contract import assert_error, assert_ok
from test_generation import COUNTING

PROMPTS = [
    "Tell me a story about a cat.",
    "What is the capital of France? Explain.",
    "Write a poem about rain.",
    "List five fruits and describe them.",
    "How do airplanes fly?",
    "Describe a sunrise over the sea.",
]


def complete(url: str, prompt: str, **extra) -> dict:
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 32, **extra}
    return assert_ok(httpx.post(url + run_url(), json=body, timeout=120))


def test_concurrent_requests_produce_what_they_produce_alone(server):
    # The shared server runs the slots KV layout, where this is promised (the pool's placement can change sums).
    alone = [complete(server.url, p)["response"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(server.url, p)["response"], PROMPTS))
    assert together == alone
    health = httpx.get(server.url + "/health").json()
    assert (health["kv_size"], health["context_window"]) == (TEST_CTX * health["slots"], TEST_CTX)


def test_a_long_stream_decodes_alike_alone_and_beside_another(server):
    # Past 256 tokens, ggml's flash attention on a CPU splits a lone stream's attention across threads, and not a
    # stream's beside another: seeded answers then diverged within a few tokens. The slots layout on a CPU runs
    # without it (LlamaModel._flash_attention), so a stream must draw the same tokens either way.
    assert httpx.get(server.url + "/health").json()["flash_attention"] is False
    prompt = "Once upon a time in a land far away there lived a king who had three daughters. " * 18
    sampling = {"raw": True, "temperature": 1.0, "seed": 7, "max_tokens": 48}
    alone = complete(server.url, prompt, **sampling)
    assert alone["usage"]["prompt_tokens"] > 300
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, server.url, COUNTING, raw=True, max_tokens=400)
        wait_for(server.url, "slots_busy", 1)
        beside = complete(server.url, prompt, **sampling)
        assert not running.done()
    assert beside["response"] == alone["response"]


def test_the_slots_layout_is_sized_by_ctx_size_alone(tmp_path):
    proc = ServerProcess(tmp_path / "both.log", "--kv-layout", "slots", "--kv-size", "4096")
    assert proc.process.wait(timeout=120) == 1
    proc.stop()
    assert "in the slots layout each slot holds --ctx-size" in proc.log()


def test_a_long_prompt_joins_running_streams_without_disturbing_them(server):
    expected = complete(server.url, PROMPTS[0], max_tokens=48)["response"]
    long_prompt = "The history of the world, told briefly: " + "and then more happened, " * 120
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(complete, server.url, PROMPTS[0], max_tokens=48)
        time.sleep(0.2)
        joining = pool.submit(complete, server.url, long_prompt, raw=True, max_tokens=8)
        assert running.result()["response"] == expected
        assert joining.result()["usage"]["prompt_tokens"] > 500


def test_flash_attention_off_is_refused_for_a_quantized_cache(tmp_path):
    proc = ServerProcess(tmp_path / "fa.log", "--flash-attention", "off", "--cache-type", "q8_0")
    assert proc.process.wait(timeout=120) == 1
    proc.stop()
    assert "a q8_0 cache needs flash attention" in proc.log()


@pytest.mark.parametrize("flash_attention", ["auto", "on"])
def test_a_prompt_computed_while_streams_wait_gives_what_it_gives_alone(tmp_path, flash_attention):
    # In the slots layout an idle server computes several prompt blocks per call and a busy one, at the smallest
    # stall bound, one block a step; the outputs must not tell which. This layout runs without flash attention by
    # default, so an idle server takes the whole prompt in one call; with it on, 16-token blocks (under ggml's
    # flash attention tile) share a call at most 3 per prompt.
    args = ("--kv-layout", "slots", "--parallel", "2", "--ctx-size", "2048", "--prefill-block", "16")
    args += ("--flash-attention", flash_attention)
    prompt = "The history of the world, told briefly: " + "and then more happened, " * 40
    with ServerProcess(tmp_path / "slots.log", *args, "--max-stall-ms", "1") as proc:
        assert httpx.get(f"{proc.url}/health").json()["flash_attention"] is (flash_attention == "on")
        assert complete(proc.url, prompt, raw=True, max_tokens=1)["usage"]["prompt_tokens"] > 200
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(complete, proc.url, COUNTING, raw=True, max_tokens=400)
            wait_for(proc.url, "slots_busy", 1)
            # A different first block, so nothing of it is cached: all of it is computed beside the stream.
            joined = pool.submit(complete, proc.url, "Briefly. " + prompt, raw=True, max_tokens=16).result()
            assert not running.done()
            assert running.result()["usage"]["completion_tokens"] == 400
        assert joined["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    with ServerProcess(tmp_path / "fresh.log", *args) as fresh:
        assert complete(fresh.url, "Briefly. " + prompt, raw=True, max_tokens=16)["response"] == joined["response"]


def test_shared_prefix_is_reused_and_reported(client):
    block = client.get("/health").json()["prefill_block"]
    system = "You are a meticulous assistant. " * 20
    turn = [{"role": "system", "content": system}, {"role": "user", "content": "Name a prime number."}]
    first = assert_ok(client.post(run_url(), json={"messages": turn, "temperature": 0, "max_tokens": 12}))
    turn2 = [{"role": "system", "content": system}, {"role": "user", "content": "Name an even number."}]
    second = assert_ok(client.post(run_url(), json={"messages": turn2, "temperature": 0, "max_tokens": 12}))
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # The whole system turn (well over 100 tokens) came from the cache, the differing user turn did not.
    assert 100 < cached < second["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < cached
    # Reuse changes no output: the same request again gives the same answer from an almost fully cached prompt.
    again = assert_ok(client.post(run_url(), json={"messages": turn, "temperature": 0, "max_tokens": 12}))
    assert again["response"] == first["response"]
    # All but the last token could be reused; reuse stops at a block boundary (see CPU_PREFILL_BLOCK).
    reusable = (first["usage"]["prompt_tokens"] - 1) // block * block
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == reusable


def test_session_affinity_keeps_a_conversation_on_its_slot(server, client):
    background = "I work on compilers, and I like long walks, tea, and chess. " * 10
    history = [{"role": "user", "content": f"My name is Ada. {background} Remember my name."}]
    headers = {"x-session-affinity": "conversation-ada"}
    first = assert_ok(
        client.post(run_url(), json={"messages": history, "temperature": 0, "max_tokens": 16}, headers=headers)
    )
    # Other users' requests, on slots of their own, come in between.
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: complete(server.url, p, max_tokens=4), PROMPTS[:3]))
    history += [
        {"role": "assistant", "content": first["response"]},
        {"role": "user", "content": "What is my name?"},
    ]
    second = assert_ok(
        client.post(run_url(), json={"messages": history, "temperature": 0, "max_tokens": 8}, headers=headers)
    )
    block = client.get("/health").json()["prefill_block"]
    reusable = first["usage"]["prompt_tokens"] // block * block
    assert reusable >= block
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= reusable


def long_stream(url: str, opened: threading.Event, stop: threading.Event) -> None:
    body = {"prompt": COUNTING, "raw": True, "temperature": 0, "max_tokens": 900, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", url + run_url(), json=body) as response:
        opened.set()
        for _ in response.iter_bytes():
            if stop.is_set():
                return


def test_full_queue_answers_429_at_once_and_drops_clients_that_leave(tight):
    url = tight.url
    stop = threading.Event()
    first, second = threading.Event(), threading.Event()
    runner = threading.Thread(target=long_stream, args=(url, first, stop))
    waiter = threading.Thread(target=long_stream, args=(url, second, stop))
    runner.start()
    wait_for(url, "slots_busy", 1)
    waiter.start()
    wait_for(url, "queue_depth", 1)

    refused = httpx.post(url + run_url(), json={"prompt": "Say hi.", "max_tokens": 2}, timeout=30)
    assert_error(refused, 429, 3040, "Capacity temporarily exceeded")

    stop.set()  # both clients hang up: the waiting one leaves the queue, the running one frees its slot
    runner.join(30)
    waiter.join(30)
    wait_for(url, "queue_depth", 0)
    wait_for(url, "slots_busy", 0)
    assert assert_ok(httpx.post(url + run_url(), json={"prompt": "Say hi.", "max_tokens": 2}, timeout=30))


def test_metrics_count_this_tests_own_requests(client):
    wait_idle(client, timeout=30)
    before = client.get("/metrics").text
    turn = [
        {"role": "system", "content": "You are a meticulous assistant. " * 20},
        {"role": "user", "content": "Count what the metrics count."},
    ]
    body = {"messages": turn, "max_tokens": 5, "temperature": 0}
    usages = [assert_ok(client.post(run_url(), json=body))["usage"]]
    with client.stream("POST", run_url(), json={**body, "stream": True}) as response:
        final = [line for line in response.iter_lines() if line.startswith("data: {")][-1]
    usages.append(json.loads(final.removeprefix("data: "))["usage"])
    assert_error(client.post(run_url(), json={"prompt": ""}), 400, 5006)
    wait_idle(client, timeout=10)  # the stream's last event may reach us a moment before its slot is given back
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def delta(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels, absent=0)

    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 100  # the repeat came from the cache, and the metrics must say so
    assert (
        delta("workers_ai_cached_prompt_tokens_total") == cached + usages[0]["prompt_tokens_details"]["cached_tokens"]
    )
    assert delta("workers_ai_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("workers_ai_completion_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("workers_ai_requests_total", '{status="400"}') == 1
    assert delta("workers_ai_requests_total", '{status="200"}') >= 2
    assert delta("workers_ai_time_to_first_token_seconds_count") == 2
    assert delta("workers_ai_inter_token_seconds_count") >= 2
    # A gap between tokens for every step after a request's first token (the last may end it instead of making
    # one); a gap between pieces of text spans one or more of them.
    steps = delta("workers_ai_token_gap_seconds_count")
    assert sum(u["completion_tokens"] - 1 for u in usages) <= steps <= sum(u["completion_tokens"] for u in usages)
    assert steps >= delta("workers_ai_inter_token_seconds_count")
    assert metric(after, "workers_ai_queue_depth") == 0
    assert metric(after, "workers_ai_slots_busy") == 0
    assert metric(after, "workers_ai_slots") == client.get("/health").json()["slots"]
    # The engine's working time grew by this test's requests, and llama_decode took part of it, not more.
    busy, inside = delta("workers_ai_engine_busy_seconds"), delta("workers_ai_engine_decode_seconds")
    assert 0 < inside < busy
