"""Time to first token of a prompt the server has seen before: cold (new to the cache), an exact repeat, and the
next turn of the same conversation, for a short chat request and a
long document (about 2,000 tokens).

One server, one request at a time, rounds interleaved: each round sends a prompt no slot holds (a new word at its
start), then the same request again, then the conversation's next turn (the first answer plus a short question).
TTFT is taken at the first streamed token; `cached_tokens` is what the server reports it reused.

    .venv/bin/python bench/repeat_cache.py [--model SOURCE] [--rounds 7] [--kv-layout auto|slots|pool]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from local_server import model_source, start_server

from workers_ai_local.config import physical_cores

RUN = "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
SHORT = "{nonce}: in one sentence, why does the sky look blue during the day?"
FILLER = " ".join(f"Paragraph {i}: the committee reviewed budget item {i * 7} and noted no changes." for i in range(99))
LONG = "{nonce}. Here are the minutes of a long meeting. " + FILLER + " Summarise them in one sentence."


def streamed(client: httpx.Client, messages: list[dict[str, str]]) -> tuple[float, str, int, int]:
    """TTFT in seconds, the answer, and the prompt and cached token counts."""
    body = {"messages": messages, "stream": True, "max_tokens": 12, "temperature": 0}
    started = time.perf_counter()
    first = None
    text: list[str] = []
    usage: dict = {}
    with client.stream("POST", RUN, json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("response") and first is None:
                first = time.perf_counter() - started
            text.append(event.get("response", ""))
            usage = event.get("usage") or usage
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return first or float("nan"), "".join(text), usage.get("prompt_tokens", 0), cached


def measure(client: httpx.Client, template: str, rounds: int) -> dict[str, list[tuple[float, int, int]]]:
    runs: dict[str, list[tuple[float, int, int]]] = {"cold": [], "exact repeat": [], "next turn": []}
    for round_ in range(rounds + 1):
        messages = [{"role": "user", "content": template.format(nonce=f"Note{round_}x{time.time_ns() % 9973}")}]
        cold, answer, prompt, cached = streamed(client, messages)
        repeat = streamed(client, messages)
        follow = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
        turn = streamed(client, follow)
        if round_:  # round 0 warms the server up
            runs["cold"].append((cold, prompt, cached))
            runs["exact repeat"].append((repeat[0], repeat[2], repeat[3]))
            runs["next turn"].append((turn[0], turn[2], turn[3]))
    return runs


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--rounds", type=int, default=7)
    cli.add_argument("--kv-layout", default="auto", help="slots reuse prefixes in whole blocks, the pool to the token")
    args = cli.parse_args()
    proc, base = start_server("--model", model_source(args.model), "--ctx-size", "4096", "--kv-layout", args.kv_layout)
    layout = httpx.get(base + "/health").json()["kv_layout"]
    print(f"{args.model}, {layout} layout, {physical_cores()} threads, {args.rounds} rounds, TTFT ms (median, min-max)")
    print("| prompt | request | prompt tokens | cached tokens | TTFT ms | spread |\n|---|---|---:|---:|---:|---|")
    try:
        with httpx.Client(base_url=base, timeout=600) as client:
            for name, template in (("short chat", SHORT), ("long document", LONG)):
                for kind, values in measure(client, template, args.rounds).items():
                    ttft = [v[0] * 1000 for v in values]
                    prompt, cached = values[-1][1], values[-1][2]
                    spread = f"{min(ttft):.0f}-{max(ttft):.0f}"
                    print(f"| {name} | {kind} | {prompt} | {cached} | {statistics.median(ttft):.0f} | {spread} |")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
