"""What grammar-constrained decoding costs: the same prompt decoded freely and in JSON mode (the grammar path
tool calls take too; their answers are too short to time on their own).

Non-streamed requests to one server, interleaved round by round. Decode tokens/s is (completion tokens - 1)
over (request time - the time of the same request cut to one token), so prompt processing, which a grammar
does not touch, is left out; the prompt is cached alike for all three (a warm-up request precedes the rounds).

    .venv/bin/python bench/grammar_cost.py [--model SOURCE] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from local_server import start_server

from server.config import physical_cores

PROMPT = "Describe a made-up person: their name, age, city, and three hobbies."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
}

CASES = {
    "free": {"prompt": PROMPT},
    "JSON mode (schema)": {"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": PERSON}},
}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--rounds", type=int, default=5)
    args = cli.parse_args()
    proc, base = start_server("--model", args.model, "--parallel", "1")
    url = f"{base}/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
    try:
        rates: dict[str, list[float]] = {name: [] for name in CASES}

        def timed(body: dict, max_tokens: int) -> tuple[float, int]:
            started = time.perf_counter()
            response = httpx.post(url, json={**body, "temperature": 0, "max_tokens": max_tokens}, timeout=300)
            elapsed = time.perf_counter() - started
            tokens = response.json()["result"]["usage"]["completion_tokens"] if max_tokens > 1 else 1
            return elapsed, tokens

        for round_ in range(args.rounds + 1):
            for name, body in CASES.items():
                first, _ = timed(body, 1)
                elapsed, tokens = timed(body, 160)
                if round_:  # round 0 warms up and caches the prompts
                    rates[name].append((tokens - 1) / (elapsed - first))
    finally:
        proc.terminate()
        proc.wait()
    free = statistics.median(rates["free"])
    print(f"model {args.model}, {physical_cores()} threads, {args.rounds} rounds, greedy")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<20} {rate:7.1f} tok/s  {rate / free:5.0%} of free decoding")


if __name__ == "__main__":
    main()
