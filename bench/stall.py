"""How long a running stream stalls when newcomers arrive: one stream generating, then three requests with
~100-token prompts arriving together. Reported per server setting, side by side and taking turns: the running
stream's longest gap between tokens (as the server's request log tells it: a token that completes no character
sends no event, so the client's longest gap between events, also shown, can span two steps), the newcomers' time to
first token, and aggregate tokens/s over the round.

Compared, each over 4 slots of 2,048 cells: the slots layout (what `auto` picks at `--ctx-size 2048`) under the
default stall bound (`--max-stall-ms 1000`, prompt blocks sized by the model) and with no bound
(`--prefill-block 64 --max-stall-ms 0`: a whole 512-token batch of prompt work per step, as llama-server does), and
one KV pool of the same cells under the default bound (what `auto` picks for the 8B at its trained window; the
stream's token shares the prompt tokens' call).

    .venv/bin/python bench/stall.py [--model llama31-8b] [--rounds 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from concurrency import RESULTS
from local_server import model_source, start_server

from workers_ai_local.config import physical_cores

URL = "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"
RUNNING = "/client/v4/accounts/running-stream/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"  # its own log lines
SETTINGS = {
    "slots, stall bound": [],
    "slots, no bound, 64-token blocks": ["--prefill-block", "64", "--max-stall-ms", "0"],
    # One pool of the same 4 x 2048 cells: the stream's token shares the prompts' call (one pass over the weights).
    "one pool, stall bound": ["--kv-layout", "pool", "--kv-size", "8192"],
}
NEWCOMER = "Here is a list of things to remember for the trip: " + ", ".join(f"item {i}" for i in range(1, 30))


@dataclass
class Round:
    longest_token_gap: float
    longest_event_gap: float
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


def longest_token_gap(log: Path, requests_before: int) -> float:
    """The running stream's longest gap between tokens, from the access line of its request number
    `requests_before` + 1 in the server's log."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if f"POST {RUNNING} 200" in line]
        if len(lines) > requests_before:
            found = re.search(r"longest_token_gap=(\d+\.\d+)s", lines[requests_before])
            if found is None:
                raise SystemExit(f"no longest_token_gap in {lines[requests_before]!r}")
            return float(found[1])
        time.sleep(0.1)
    raise SystemExit(f"the running stream's request never reached {log}")


def one_round(base: str, tokens: int, round_id: str, log: Path, requests_before: int) -> tuple[Round, int]:
    stamps: list[float] = []
    firsts: list[float] = []
    usage: dict = {}
    body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": True, "max_tokens": tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    arrivals: list[threading.Thread] = []
    with httpx.stream("POST", base + RUNNING, json=body, timeout=900) as response:
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
    token_gap = longest_token_gap(log, requests_before)
    return Round(token_gap, max(gaps), statistics.median(firsts), generated / elapsed), usage.get("prompt_tokens", 0)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="llama31-8b")
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--tokens", type=int, default=48)
    args = cli.parse_args()
    model = model_source(args.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    logs = {name: RESULTS / f"stall-{index}.log" for index, name in enumerate(SETTINGS)}
    servers = {name: start_server("--model", model, "--parallel", "4", "--ctx-size", "2048", *extra, log=logs[name])
               for name, extra in SETTINGS.items()}  # fmt: skip
    results: dict[str, list[Round]] = {name: [] for name in SETTINGS}
    try:
        for name, (_, base) in servers.items():
            one_round(base, 8, "warm-up", logs[name], 0)  # weights paged in, buffers allocated
        for round_ in range(args.rounds):
            for name, (_, base) in servers.items():
                results[name].append(one_round(base, args.tokens, f"round {round_}", logs[name], round_ + 1)[0])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    print(f"model {args.model}, {physical_cores()} threads, {args.rounds} rounds taking turns; median (min-max)")
    print(
        "| setting | running stream's longest gap between tokens, s | ... between events, s | newcomers' TTFT, s "
        "| aggregate tok/s |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, rounds in results.items():
        cells = []
        for field in ("longest_token_gap", "longest_event_gap", "newcomer_ttft", "tokens_per_s"):
            values = [getattr(r, field) for r in rounds]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
