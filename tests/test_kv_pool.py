"""One KV pool for every request, memory that is told, and every repeated prompt served from the cache."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import MODEL, ServerProcess, metric, run_url, wait_for
from test_contract import assert_error, assert_ok
from test_generation import COUNTING


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Four requests at once over a 4096-token pool: the former layout gave each slot 1024 tokens."""
    log = tmp_path_factory.mktemp("pool") / "server.log"
    proc = ServerProcess(log, "--parallel", "4", "--kv-size", "4096", "--ctx-size", "4096")
    with proc:
        yield proc


def long_prompt(tokens_wanted: int, tag: str) -> str:
    return f"{tag}: " + " ".join(f"word{i % 97}" for i in range(tokens_wanted // 3))


def raw_tokens(url: str, prompt: str) -> int:
    """How many tokens the server makes of a raw prompt."""
    body = {"prompt": prompt, "raw": True}
    return len(assert_ok(httpx.post(f"{url}/ai/tokenize/{MODEL}", json=body, timeout=60))["tokens"])


def test_one_request_may_use_more_than_a_slots_former_share(pool):
    health = httpx.get(pool.url + "/health").json()
    assert (health["kv_size"], health["context_window"], health["slots"]) == (4096, 4096, 4)
    assert health["kv_layout"] == "pool"  # --kv-size always means a pool
    body = {"prompt": long_prompt(2400, "one"), "raw": True, "max_tokens": 8, "temperature": 0}
    result = assert_ok(httpx.post(pool.url + run_url(), json=body, timeout=120))
    assert result["usage"]["prompt_tokens"] > 4096 // 4  # more than the 1024 tokens a slot used to hold


def test_a_request_that_fits_the_pool_but_not_its_free_part_waits(pool):
    # Two requests of ~2400 prompt tokens and 200 to generate cannot be in the 4096-token pool together: the second
    # waits for the first and then runs; neither fails.
    bodies = [
        {"prompt": long_prompt(2400, tag), "raw": True, "max_tokens": 200, "temperature": 0} for tag in ("a", "b")
    ]
    with ThreadPoolExecutor(2) as run:
        started = time.monotonic()
        futures = [run.submit(httpx.post, pool.url + run_url(), json=body, timeout=300) for body in bodies]
        time.sleep(1.0)
        health = httpx.get(pool.url + "/health").json()
        assert health["slots_busy"] == 1 and health["queue_depth"] == 1, health
        assert health["kv_reserved"] <= health["kv_size"]
        results = [assert_ok(future.result()) for future in futures]
    assert all(r["usage"]["prompt_tokens"] > 1024 for r in results), results
    assert time.monotonic() - started < 300


def test_reject_if_busy_counts_the_pool_not_only_the_slots(pool):
    # One stream claims most of the pool (its prompt and 3500 tokens to generate): three slots are free, yet a
    # request whose cells do not fit beside it would wait, so under rejectIfBusy it is refused; a small one runs.
    holding = {"prompt": COUNTING, "raw": True, "max_tokens": 3500, "temperature": 0, "stream": True}
    with httpx.Client(base_url=pool.url, timeout=120) as http:
        with http.stream("POST", run_url(), json=holding) as stream:
            assert next(line for line in stream.iter_lines() if line).startswith("data: {")
            big = {"prompt": "Say hi.", "max_tokens": 1000, "options": {"rejectIfBusy": True}}
            assert_error(http.post(run_url(), json=big), 429, 3040)
            assert "rejected at once (rejectIfBusy): the KV pool holds 4096 tokens" in pool.log()
            small = assert_ok(http.post(run_url(), json={**big, "max_tokens": 2}))
            assert small["usage"]["completion_tokens"] <= 2
        wait_for(pool.url, "slots_busy", 0)


def test_conversations_taking_turns_keep_their_own_prefixes(pool):
    # Four conversations, no session header, one request at a time: each one's second turn finds its first turn's
    # prompt still cached, because a newcomer takes an empty or least recently used slot, not another's.
    tags = ("north", "south", "east", "west")
    prompts = {tag: long_prompt(300, tag) for tag in tags}
    for tag in tags:
        assert_ok(httpx.post(pool.url + run_url(), json={"prompt": prompts[tag], "raw": True, "max_tokens": 1}))
    for tag in tags:
        body = {"prompt": prompts[tag] + " and more", "raw": True, "max_tokens": 1}
        usage = assert_ok(httpx.post(pool.url + run_url(), json=body, timeout=60))["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 256, (tag, usage)


def test_the_pool_reuses_a_cached_prefix_to_the_token(pool):
    # The slots layout reuses whole blocks only (its determinism); the pool reuses every cached token, as
    # llama-server does, so a prompt extending a cached one computes only what it adds.
    block = httpx.get(pool.url + "/health").json()["prefill_block"]
    first = long_prompt(200, "extended")
    tokens = raw_tokens(pool.url, first)
    assert tokens % block  # not on a block boundary, so reuse by blocks would fall short
    assert_ok(httpx.post(pool.url + run_url(), json={"prompt": first, "raw": True, "max_tokens": 1}, timeout=60))
    body = {"prompt": first + " and then some more", "raw": True, "max_tokens": 1}
    usage = assert_ok(httpx.post(pool.url + run_url(), json=body, timeout=60))["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == tokens, usage


def test_a_short_conversation_keeps_its_slot_and_a_few_tokens_in_common_take_none(pool):
    # In the pool every cached token in common is reused, but a slot is chosen by whole blocks in common, or by every
    # token where the prompt extends all the slot holds. So a conversation's next turn finds its own slot however
    # short its history (under one block here), and a new chat that shares only a short system prompt's turn with it
    # does not take that slot, which would evict the conversation to save a few tokens.
    block = httpx.get(pool.url + "/health").json()["prefill_block"]
    system = {"role": "system", "content": "You are terse. Answer in one short sentence."}
    history = [system, {"role": "user", "content": "My name is Ada and I like tea."}]
    first = assert_ok(httpx.post(pool.url + run_url(), json={"messages": history, "max_tokens": 8}, timeout=60))
    assert first["usage"]["prompt_tokens"] < block
    other = {"messages": [system, {"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4}
    assert_ok(httpx.post(pool.url + run_url(), json=other, timeout=60))
    history += [{"role": "assistant", "content": first["response"]}, {"role": "user", "content": "My name?"}]
    second = assert_ok(httpx.post(pool.url + run_url(), json={"messages": history, "max_tokens": 4}, timeout=60))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"]


def test_a_request_that_could_never_fit_is_refused_with_the_numbers(pool):
    body = {"prompt": long_prompt(6000, "huge"), "raw": True}
    message = assert_error(httpx.post(pool.url + run_url(), json=body, timeout=60), 400, 5006, "context window")
    assert re.search(r"the prompt is \d+ tokens, but the context window holds 4096", message), message


def test_startup_tells_the_memory_plan(pool):
    line = next(line for line in pool.log().splitlines() if "memory:" in line)
    assert re.search(r"weights \d+ MiB \+ KV cache \d+ MiB \(4096 tokens at [\d.]+ KiB\)", line), line
    assert "compute buffers" in line and "MiB available" in line and "llama.cpp allocated" in line


def test_a_layout_that_cannot_fit_is_refused_at_startup(tmp_path):
    proc = ServerProcess(tmp_path / "huge.log", "--kv-size", str(64 * 1024 * 1024))
    assert proc.process.wait(timeout=120) == 1
    proc.stop()
    log = proc.log()
    assert "does not fit in memory" in log and "MiB available" in log and "lower --kv-size" in log


def test_a_quantized_cache_takes_less_memory(tmp_path):
    sizes = {}
    for cache_type in ("f16", "q8_0"):
        proc = ServerProcess(tmp_path / f"{cache_type}.log", "--kv-size", "2048", "--cache-type", cache_type)
        try:
            proc.wait_ready()
            answer = assert_ok(httpx.post(proc.url + run_url(), json={"prompt": "Say hi.", "max_tokens": 4}))
            assert answer["usage"]["completion_tokens"] >= 1
            line = next(line for line in proc.log().splitlines() if "memory:" in line)
            sizes[cache_type] = int(re.search(r"KV cache (\d+) MiB", line)[1])
        finally:
            proc.stop()
    assert sizes["q8_0"] * 1.8 < sizes["f16"], sizes


# -- every repeat from the cache ---------------------------------------------------------------------------------------


@pytest.fixture
def pool_client(pool: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pool.url, timeout=120) as http:
        yield http


def test_an_exact_repeat_of_a_short_prompt_computes_nothing_and_answers_the_same(pool_client):
    client = pool_client  # the default pool layout: an exact repeat is served from the cache there too
    messages = [{"role": "user", "content": "Name three colours, briefly."}]
    body = {"messages": messages, "max_tokens": 24, "temperature": 0}
    first = assert_ok(client.post(run_url(), json=body))
    assert first["usage"]["prompt_tokens"] < 64  # shorter than one prompt block: reuse by blocks could not serve it
    again = assert_ok(client.post(run_url(), json=body))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"]
    assert again["response"] == first["response"]
    with client.stream("POST", run_url(), json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = "".join(event.get("response", "") for event in events)
    assert streamed == first["response"]


def test_a_repeat_with_sampling_is_the_same_as_a_cold_one(client, server, tmp_path):
    # Seeded sampling from the kept logits draws exactly what a cold server draws.
    body = {"prompt": COUNTING, "raw": True, "max_tokens": 16, "temperature": 1.1, "seed": 5}
    assert_ok(client.post(run_url(), json=body))
    warm = assert_ok(client.post(run_url(), json=body))
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == warm["usage"]["prompt_tokens"]
    cold = ServerProcess(tmp_path / "cold.log", "--ctx-size", "1024").wait_ready()
    try:
        assert assert_ok(httpx.post(cold.url + run_url(), json=body, timeout=60))["response"] == warm["response"]
    finally:
        cold.stop()


def prompt_calls_while_a_stream_runs(url: str) -> tuple[int, int]:
    """A stream runs; a ~768-token prompt arrives. Returns the llama_decode calls that prompt took (the engine's own
    count, from /metrics: nothing the clients' timing can blur) and its token count."""
    body = {"prompt": COUNTING, "raw": True, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + run_url(), json=body, timeout=120) as response:
        lines = response.iter_lines()
        tokens = 0
        while tokens < 3:  # running: its prompt computed and counted before the newcomer's
            line = next(lines)
            tokens += line.startswith("data: {") and '"response":""' not in line.replace(" ", "")
        joining = {"prompt": long_prompt(768, "joining"), "raw": True, "max_tokens": 1, "temperature": 0}
        prompt_tokens = assert_ok(httpx.post(url + run_url(), json=joining, timeout=120))["usage"]["prompt_tokens"]
        # The newcomer's request is counted once its response is sent; the stream's only when it ends, later.
        deadline = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, "workers_ai_prompt_decode_calls_count") < 1:
            assert time.monotonic() < deadline, "the newcomer's request was never counted"
            time.sleep(0.05)
        calls = metric(httpx.get(url + "/metrics").text, "workers_ai_prompt_decode_calls_sum")
    return int(calls), int(prompt_tokens)


def prompt_of(url: str, tag: str, tokens: int, past_boundary: int) -> str:
    """A raw prompt of at least `tokens` tokens whose last block holds `past_boundary` tokens (0: it ends on a block
    boundary), the block being this server's prefill block."""
    block = httpx.get(url + "/health").json()["prefill_block"]

    def prompt_and_count(words: int) -> tuple[str, int]:
        prompt = long_prompt(3 * words, tag)
        return prompt, raw_tokens(url, prompt)

    words = tokens * 100 // prompt_and_count(100)[1]
    while True:
        prompt, count = prompt_and_count(words)
        if count >= tokens and count % block == past_boundary % block:
            return prompt
        words += 1


def stream_into(order: list[str], url: str, name: str, prompt: str, max_tokens: int) -> None:
    """Stream a raw completion, appending `name` to `order` for each event that carries text."""
    body = {"prompt": prompt, "raw": True, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + run_url(), json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("response"):
                order.append(name)


def test_prompts_that_arrive_together_start_their_streams_together(tmp_path):
    # An idle pool computes a long prompt in whole batches; a prompt that arrives meanwhile was queued before the
    # first stream started, so the step after that stream's first token takes it whole beside the stream's token,
    # and the second stream starts one step after the first. Had the stall bound counted it a newcomer, the second
    # prompt (~400 tokens, one 64-token block a step) would have kept its first token back for ~6 of the first
    # stream's tokens. Its last block holds 5 tokens, so no rule that treats prompts ending on a block boundary
    # differently passes by chance.
    args = ("--parallel", "2", "--kv-size", "4096", "--ctx-size", "4096", "--max-stall-ms", "1")
    order: list[str] = []
    with ServerProcess(tmp_path / "together.log", *args) as proc, ThreadPoolExecutor(2) as clients:
        first_prompt, second_prompt = (prompt_of(proc.url, name, n, 5) for name, n in (("first", 700), ("second", 400)))
        first = clients.submit(stream_into, order, proc.url, "first", first_prompt, 30)
        wait_for(proc.url, "slots_busy", 1)  # admitted: its prompt's first calls are running
        second = clients.submit(stream_into, order, proc.url, "second", second_prompt, 4)
        first.result(), second.result()
    assert order.count("first") >= 20 and order.count("second") >= 2, order
    assert order[: order.index("second")].count("first") <= 2, order


def test_a_joining_prompt_takes_one_block_a_step_under_the_stall_bound(tmp_path):
    # At the smallest bound each step's call comes to one 64-token block: the running stream's token and 63 of the
    # newcomer's; with no bound the prompt goes in two steps of up to 512 tokens.
    calls = {}
    for stall in ("1", "0"):
        args = ("--parallel", "2", "--kv-size", "4096", "--ctx-size", "2048", "--max-stall-ms", stall)
        with ServerProcess(tmp_path / f"stall-{stall}.log", *args) as proc:
            calls[stall], prompt_tokens = prompt_calls_while_a_stream_runs(proc.url)
    steps = -(-prompt_tokens // 63)
    assert steps >= 12
    assert calls["1"] == steps
    assert calls["0"] == 2


def test_a_prompt_finished_in_a_step_streams_beside_the_others_in_the_slots_layout(tmp_path):
    # Slots layout, one block a step: a newcomer's last, shorter block leaves the step room for more. Its sampled
    # tokens are a stream's from then on, one a step beside the running stream, never fed as prompt chunks within
    # the step while the running stream waits (which gave the newcomer every token it asked for in one step).
    args = ("--parallel", "2", "--ctx-size", "2048", "--kv-layout", "slots", "--max-stall-ms", "1")
    with ServerProcess(tmp_path / "slots.log", *args) as proc:
        newcomer_prompt = prompt_of(proc.url, "finished in a step", 400, 5)
        order: list[str] = []
        with ThreadPoolExecutor(2) as clients:
            running = clients.submit(stream_into, order, proc.url, "running", COUNTING, 200)
            while order.count("running") < 3:
                time.sleep(0.01)
            newcomer = clients.submit(stream_into, order, proc.url, "newcomer", newcomer_prompt, 30)
            running.result(), newcomer.result()
    assert order.count("newcomer") >= 20, order
    start = order.index("newcomer")
    runs = "".join("n" if name == "newcomer" else "r" for name in order[start:]).split("r")
    assert max(len(run) for run in runs) <= 10, order
