"""How long a running stream stalls when newcomers arrive: one stream generating, then three requests with
~100-token prompts arriving together. Reported per server setting, side by side and taking turns: the running
stream's longest gap between tokens, the newcomers' time to first token, and aggregate tokens/s over the round.

Compared: the default (`--max-stall-ms 1000`, prompt blocks sized by the model) against no stall bound
(`--prefill-block 64 --max-stall-ms 0`: a whole 512-token batch of prompt work per step, as llama-server does) and
the default bound in one KV pool of the same cells (where the stream's token shares the blocks' call).

    .venv/bin/python bench/stall.py [--model llama31-8b] [--rounds 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from dataclasses import dataclass

import httpx
from local_server import model_source, start_server

from server.config import physical_cores

URL = "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
SETTINGS = {
    "stall bound (default)": [],
    "no bound, 64-token blocks": ["--prefill-block", "64", "--max-stall-ms", "0"],
    # One pool of the same 4 x 2048 cells: the stream's token shares the blocks' call (one pass over the weights).
    "stall bound, one KV pool": ["--kv-layout", "pool", "--kv-size", "8192"],
}
NEWCOMER = "Here is a list of things to remember for the trip: " + ", ".join(f"item {i}" for i in range(1, 30))


@dataclass
class Round:
    longest_gap: float
    newcomer_ttft: float
    tokens_per_s: float


def newcomer(base: str, label: str, results: list[float], started: float) -> None:
    # A prompt never seen before (a cached one would cost nothing to start).
    body = {"prompt": f"{label}. {NEWCOMER}", "raw": True, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + URL, json=body, timeout=900) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                results.append(time.perf_counter() - started)
                return


def one_round(base: str, tokens: int, round_id: str) -> tuple[Round, int]:
    stamps: list[float] = []
    firsts: list[float] = []
    usage: dict = {}
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True, "max_tokens": tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    arrivals: list[threading.Thread] = []
    with httpx.stream("POST", base + URL, json=body, timeout=900) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "usage" in event:
                usage = event["usage"]
                continue
            stamps.append(time.perf_counter())
            if len(stamps) == 4:  # the stream runs; now the newcomers arrive, together
                arrival = time.perf_counter()
                labels = [f"{round_id}-{i}" for i in range(3)]
                arrivals = [threading.Thread(target=newcomer, args=(base, x, firsts, arrival)) for x in labels]
                for thread in arrivals:
                    thread.start()
    for thread in arrivals:
        thread.join()
    elapsed = time.perf_counter() - started
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    generated = usage.get("completion_tokens", len(stamps)) + 3 * 8
    return Round(max(gaps), statistics.median(firsts), generated / elapsed), usage.get("prompt_tokens", 0)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="llama31-8b")
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--tokens", type=int, default=48)
    args = cli.parse_args()
    model = model_source(args.model)
    servers = {name: start_server("--model", model, "--parallel", "4", "--ctx-size", "2048", *extra)
               for name, extra in SETTINGS.items()}  # fmt: skip
    results: dict[str, list[Round]] = {name: [] for name in SETTINGS}
    try:
        for _, base in servers.values():
            one_round(base, 8, "warm-up")  # weights paged in, buffers allocated
        for round_ in range(args.rounds):
            for name, (_, base) in servers.items():
                results[name].append(one_round(base, args.tokens, f"round {round_}")[0])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    print(f"model {args.model}, {physical_cores()} threads, {args.rounds} rounds taking turns; median (min-max)")
    print("| setting | longest gap of the running stream, s | newcomers' TTFT, s | aggregate tok/s |")
    print("|---|---:|---:|---:|")
    for name, rounds in results.items():
        cells = []
        for field in ("longest_gap", "newcomer_ttft", "tokens_per_s"):
            values = [getattr(r, field) for r in rounds]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
