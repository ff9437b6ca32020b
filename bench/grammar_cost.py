"""What grammar-constrained decoding costs: the same prompt decoded freely and in JSON mode (the grammar path
tool calls take too; their answers are too short to time on their own), on the embedded model (49K vocabulary)
and on the Llama 3.1 stand-in (the real 128K vocabulary, where masking the whole vocabulary hurts most).

Non-streamed requests to one server per model, interleaved round by round. Decode tokens/s is (completion tokens
- 1) over (request time - the time of the same request cut to one token), so prompt processing, which a grammar
does not touch, is left out; prompts are cached alike (a warm-up round precedes the measured ones). Tokens a
grammar forces count as decoded: they are the answer's tokens, produced without sampling.

    .venv/bin/python bench/grammar_cost.py [--model SOURCE ...] [--rounds 5] [--tokens 160]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from local_server import model_source, start_server

from workers_ai_local.config import physical_cores

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


def measure(model: str, rounds: int, max_tokens: int, temperature: float) -> dict[str, list[float]]:
    # A slot per case, so each finds its own prompt cached (their prompts differ: JSON mode shows the schema).
    proc, base = start_server("--model", model_source(model), "--parallel", str(len(CASES)))
    url = f"{base}/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
    rates: dict[str, list[float]] = {name: [] for name in CASES}

    def timed(case: str, body: dict, tokens_asked: int) -> tuple[float, int]:
        started = time.perf_counter()
        sampling = {"temperature": temperature, "seed": 7, "max_tokens": tokens_asked}
        session = {"x-session-affinity": case}  # each case keeps its own slot and cache
        response = httpx.post(url, json={**body, **sampling}, headers=session, timeout=600)
        elapsed = time.perf_counter() - started
        return elapsed, response.json()["result"]["usage"]["completion_tokens"]

    # A grammar refuses a one-token budget, so the prompt's own cost is timed on the very tokens it feeds the model
    # (its rendered text, sent raw), which the same request then finds cached.
    rendered = {
        name: httpx.post(f"{base}/ai/tokenize/@cf/meta/llama-3.1-8b-instruct-fast", json=body).json()["result"]
        for name, body in CASES.items()
    }
    try:
        for round_ in range(rounds + 1):
            for name, body in CASES.items():
                first, _ = timed(name, {"prompt": rendered[name]["prompt"], "raw": True}, 1)
                elapsed, tokens = timed(name, body, max_tokens)
                if round_:  # round 0 warms up and caches the prompts
                    rates[name].append((tokens - 1) / (elapsed - first))
    finally:
        proc.terminate()
        proc.wait()
    return rates


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", action="append", help="a --model source or a stand-in (llama31-tiny, llama31-8b)")
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--tokens", type=int, default=160)
    cli.add_argument("--temperature", type=float, default=0.0)
    args = cli.parse_args()
    models = args.model or ["smollm2-135m-instruct", "llama31-tiny"]
    setting = f"up to {args.tokens} tokens, temperature {args.temperature}"
    print(f"{physical_cores()} threads, {args.rounds} rounds, {setting}")
    print("| model | decoding | tok/s (median) | spread | vs free |\n|---|---|---:|---|---:|")
    for model in models:
        rates = measure(model, args.rounds, args.tokens, args.temperature)
        free = statistics.median(rates["free"])
        for name, values in rates.items():
            rate = statistics.median(values)
            spread = f"{min(values):.1f}-{max(values):.1f}"
            print(f"| {model} | {name} | {rate:.1f} | {spread} | {rate / free:.2f}x |")


if __name__ == "__main__":
    main()
