"""Ray Serve against one server on the same machine, in one run: what spreading the cores over replicas gives, and
what the Ray hop costs.

Three deployments stay up side by side (same model, same total threads where compared):
  ray 2x1      python -m workers_ai_local.ray_serve --replicas 2 --threads 1 (half the streams' slots each)
  server 1x2   python -m workers_ai_local --threads 2 (all the slots)
  server 1x1   python -m workers_ai_local --threads 1 (one replica's equal, for the hop's cost)

1. Aggregate tokens/s at `--streams` concurrent streams (bench/concurrency.py's clients: greedy counting prompts, no
   early stop), ray 2x1 against server 1x2, taking turns for `--rounds` rounds with fresh prompts each round.
2. Time to first token of a short, cached prompt (1 token asked, streamed), ray 2x1 against server 1x1, requests
   alternating one by one: the difference is the proxy, router and replica hop.

Medians with min-max. Writes bench/results/ray_serve.md.

    .venv/bin/python bench/ray_serve.py [--model SOURCE] [--streams 8] [--rounds 5] [--tokens 128] [--ttft 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
from concurrency import RESULTS, Contender, run_level, start_all
from local_server import free_port

RUN = "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"


def contender(name: str, module: str, *flags: str) -> Contender:
    port = free_port()
    command = [sys.executable, "-m", module, "--port", str(port), "--max-queue", "0", "--log-level", "warning", *flags]
    return Contender(
        name,
        command,
        port,
        lambda p, n: (RUN, {"prompt": p, "raw": True, "stream": True, "temperature": 0, "max_tokens": n}),
        lambda e: e.get("response"),
        lambda d: d == "[DONE]",
    )


def wait_all_replicas(url: str, replicas: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=5).json()
        if health.get("replicas_ready") == replicas:
            return
        time.sleep(0.5)
    raise SystemExit(f"{url}: {replicas} replicas never became ready")


def first_token_s(client: httpx.Client, url: str) -> float:
    body = {"prompt": "Say hello.", "stream": True, "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    with client.stream("POST", url + RUN, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"response":""' not in line.replace(" ", ""):
                return time.perf_counter() - started
    raise RuntimeError("no token came")


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--streams", type=int, default=8)
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--tokens", type=int, default=128)
    cli.add_argument("--ttft", type=int, default=40, help="requests per deployment for the TTFT comparison")
    args = cli.parse_args()

    common = ("--model", args.model, "--ctx-size", "512")
    half = str(max(1, args.streams // 2))
    ray = contender(
        "ray 2x1", "workers_ai_local.ray_serve", "--replicas", "2", "--threads", "1", "--parallel", half, *common
    )
    whole = contender("server 1x2", "workers_ai_local", "--threads", "2", "--parallel", str(args.streams), *common)
    single = contender("server 1x1", "workers_ai_local", "--threads", "1", "--parallel", half, *common)
    deployments = [ray, whole, single]
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        start_all(deployments, "ray_serve-")
        wait_all_replicas(ray.url, 2)
        for d in deployments:  # warm-up on prompts no measured request uses
            run_level(d, 2, 1, 8, first=900_000)

        rates: dict[str, list[float]] = {ray.name: [], whole.name: []}
        failed = 0
        for r in range(args.rounds):
            for d in [ray, whole] if r % 2 == 0 else [whole, ray]:
                run = run_level(d, args.streams, 1, args.tokens, first=1 + 1_000_000 * r)
                failed += run["failed"] + run["truncated"]
                rates[d.name].append(run["tokens_per_s"])
                print(f"round {r + 1} {d.name}: {run['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

        ttft: dict[str, list[float]] = {ray.name: [], single.name: []}
        with httpx.Client() as client:
            for d in (ray, single):
                first_token_s(client, d.url)  # caches the prompt
            for i in range(args.ttft):
                for d in (ray, single) if i % 2 == 0 else (single, ray):
                    ttft[d.name].append(1000 * first_token_s(client, d.url))
    finally:
        for d in deployments:
            d.stop()

    ratios = [a / b for a, b in zip(rates[ray.name], rates[whole.name], strict=True)]
    hop = [a - b for a, b in zip(ttft[ray.name], ttft[single.name], strict=True)]
    lines = [
        f"model {args.model}, {args.streams} streams of {args.tokens} tokens, {args.rounds} rounds taking turns; "
        f"TTFT over {args.ttft} alternating requests. Median (min-max).",
        "",
        f"| | tokens/s at {args.streams} streams | TTFT ms (1 token, cached prompt) |",
        "|---|---:|---:|",
        f"| ray 2x1 (2 replicas x 1 thread) | {spread(rates[ray.name])} | {spread(ttft[ray.name])} |",
        f"| server 1x2 (1 server x 2 threads) | {spread(rates[whole.name])} | |",
        f"| server 1x1 (1 server x 1 thread) | | {spread(ttft[single.name])} |",
        "",
        f"Ray 2x1 / server 1x2 tokens/s, per round: {spread(ratios, 2)}. "
        f"Ray hop, TTFT difference per request pair: {spread(hop)} ms. Failed or truncated streams: {failed}.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    (RESULTS / "ray_serve.md").write_text(markdown + "\n")


if __name__ == "__main__":
    main()
