"""Llama 3.1 8B's shape on this machine: this server, llama.cpp's llama-server and a bare llama_decode loop, side
by side in one run, taking turns.

The model is the 8B stand-in (models/llama31_standin.py: Llama 3.1 8B's shape and vocabulary, seeded random
weights, Q4_K_M by llama.cpp's own quantizer; about 5 GB, built into the cache on first use in minutes).
llama-server is built natively from the llama.cpp sources the pinned llama-cpp-python vendors
(bench/build_llama_server.sh, run first if missing). Both servers get the same threads, slots and KV cells.

This server runs twice, in its two KV layouts: slots (each request 1,024 cells of its own, what `auto` picks for
--parallel 8 --ctx-size 1024; outputs never depend on what runs beside them) and one pool of the same 8,192 cells
(what `auto` picks for the 8B at its trained window; streams share llama.cpp's calls and flash attention runs).

Each round goes measure by measure, every contender in turn within a measure (the order rotates): time to first
token of a 512-token prompt never seen before; then 1, 4 and 8 streams at once of greedy completions from short
prompts: decode tokens/s per stream (tokens after the first over the time after the first, median over streams)
and aggregate tokens/s (all tokens generated, as each server reports them, over the level's wall time, prompts
included), with the prompt tokens each server computed rather than took from its cache (llama-server reuses a
cached prefix to the token, this server's slots layout in whole blocks). The bare loop runs the 512-token prompt
and one stream. At the end, each server's peak resident memory (VmHWM: the mapped weights count
once per process), and this server's own share of its engine time outside llama_decode (its /metrics) at every
level, in each layout. A ratio is taken within each round, between measures seconds apart, and the median over
rounds reported.

    .venv/bin/python bench/llama31_8b.py [--rounds 3] [--tokens 32] [--levels 1,4,8] [--gpu]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
from pathlib import Path

import httpx
from concurrency import (
    LLAMA_SERVER,
    RESULTS,
    Contender,
    Result,
    contenders,
    engine_seconds,
    in_one_pool,
    outside_decode_percent,
    run_clients,
    start_all,
)
from local_server import model_source
from single_stream import BareLoop

from workers_ai_local.config import physical_cores

SLOTS, POOL, BARE = "this server, slots", "this server, one pool", "bare llama_decode"
LLAMA_SERVER_NAME = "llama-server"
PROMPT_TOKENS = 512
CTX = 1024  # per slot: the long prompt and its answer, or a short prompt and many tokens


def long_prompt(bare: BareLoop, label: str) -> str:
    """A prompt of exactly PROMPT_TOKENS tokens (with BOS) that starts with `label`, so no cache holds it."""
    words = 0
    while len(bare.tokenize(f"{label}:" + " apple" * (words + 1))) <= PROMPT_TOKENS:
        words += 1
    return f"{label}:" + " apple" * words


def streams(contender: Contender, count: int, tokens: int, label: str) -> tuple[list[Result], float]:
    results: list[Result] = [Result() for _ in range(count)]

    def client(index: int) -> None:
        prompt = f"{label} stream {index}: " + ", ".join(str(n) for n in range(1, 13)) + ","
        with httpx.Client() as http:
            results[index] = contender.stream(http, prompt, tokens)

    return results, run_clients(count, client)


def first_token_seconds(server: Contender, prompt: str) -> float:
    """Seconds to the first token of one stream of `prompt`."""
    with httpx.Client() as http:
        result = server.stream(http, prompt, 1)
    if result.ttft is None:
        raise SystemExit(f"{server.name} gave no token: {result.error}")
    return result.ttft


def decode_rate(result: Result) -> float:
    return (result.tokens - 1) / sum(result.gaps) if result.gaps else float("nan")


def peak_rss_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def sample_vram(servers: list[Contender], peaks: dict[str, float]) -> None:
    """Each server's GPU memory now (nvidia-smi), kept where it is the most seen so far."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    used = dict(line.split(", ") for line in subprocess.run(query, capture_output=True, text=True).stdout.splitlines())
    for server in servers:
        if server.process and str(server.process.pid) in used:
            peaks[server.name] = max(peaks.get(server.name, 0.0), int(used[str(server.process.pid)]) / 1024)


def summary(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="llama31-8b", help="a stand-in's name or a GGUF path")
    cli.add_argument("--threads", type=int, default=physical_cores())
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    cli.add_argument("--levels", default="1,4,8")
    cli.add_argument("--gpu", action="store_true", help="CUDA builds: every layer on the GPU, VRAM reported")
    args = cli.parse_args()
    if not LLAMA_SERVER.exists():
        raise SystemExit(f"{LLAMA_SERVER} is missing: run bench/build_llama_server.sh first")
    levels = [int(n) for n in args.levels.split(",")]
    slots = max(levels)
    path = Path(model_source(args.model))
    servers = [c for c in contenders(path, str(path), args.threads, slots, CTX) if c.name != "llama_cpp.server"]
    servers[0].name = SLOTS  # --parallel 8 --ctx-size 1024: the slots layout, as llama-server's -np 8 -c 8192
    servers.insert(1, in_one_pool(servers[0], POOL, slots * CTX))
    ours = servers[:2]
    if args.gpu:  # this server and the bare loop offload every layer by default; llama-server is told
        next(s for s in servers if s.name == LLAMA_SERVER_NAME).command += ["-ngl", "999"]
    vram: dict[str, float] = {}
    bare = BareLoop(path, args.threads)

    names = [server.name for server in servers] + [BARE]
    ttft: dict[str, list[float]] = {name: [] for name in names}
    decode: dict[tuple[str, int], list[float]] = {}
    aggregate: dict[tuple[str, int], list[float]] = {}
    computed: dict[tuple[str, int], list[float]] = {}
    overhead: dict[tuple[str, int], list[float]] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        start_all(servers, "llama31_8b-")
        for server in servers:
            streams(server, 1, 4, "warm-up")  # weights paged in, buffers allocated
        bare.run(4)
        for round_ in range(args.rounds):
            # The same prompts for every contender (each has a cache of its own): a name in them would make one
            # contender's prompts tokens longer than another's.
            label = f"round {round_}"
            first_prompt = long_prompt(bare, label)
            # Each measure in turn, every contender one after another within it (the order rotating with the
            # round and the measure), so the same measure of two contenders is seconds apart, not minutes: this
            # machine's speed drifts by 10-45% within minutes, and the ratios are taken within a round.
            for measure, level in enumerate([0, *levels]):
                shift = (round_ + measure) % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    if not level:
                        ttft[server.name].append(first_token_seconds(server, first_prompt))
                        continue
                    before = engine_seconds(server) if server in ours else (0.0, 0.0)
                    results, wall = streams(server, level, args.tokens, f"{label} level {level}")
                    decode.setdefault((server.name, level), []).append(
                        statistics.median(decode_rate(r) for r in results)
                    )
                    generated = sum(r.tokens if r.generated is None else r.generated for r in results)
                    aggregate.setdefault((server.name, level), []).append(generated / wall)
                    counts = [r.prompt_computed for r in results if r.prompt_computed is not None]
                    if len(counts) == len(results):
                        computed.setdefault((server.name, level), []).append(statistics.median(counts))
                    if args.gpu:
                        sample_vram(servers, vram)
                    if server in ours:
                        overhead.setdefault((server.name, level), []).append(outside_decode_percent(server, before))
                if not level:
                    ttft[BARE].append(bare.run(1, bare.tokenize(first_prompt)).ttft_s)
                elif level == 1:
                    decode.setdefault((BARE, 1), []).append(bare.run(args.tokens).decode_tps)
        peaks = {server.name: peak_rss_gib(server.process.pid) for server in servers if server.process}
    finally:
        for server in servers:
            server.stop()
    peaks[BARE] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2

    peers = (LLAMA_SERVER_NAME, BARE)
    ratio_heads = [f"{o.name.removeprefix('this server, ')} vs {peer}" for o in ours for peer in peers]
    lines = [
        f"model {path.name}, {args.threads} threads, {slots} slots of {CTX} tokens, {args.tokens} tokens per stream, "
        f"{args.rounds} rounds taking turns; median (min-max); ratios: median of the rounds' ratios (min-max)",
        "",
        f"| | {' | '.join(names)} | {' | '.join(ratio_heads)} |",
        f"|---|{'---:|' * (len(names) + len(ratio_heads))}",
    ]

    def row(title: str, cells: dict[str, list[float]], lower_is_better: bool = False, digits: int = 1) -> None:
        shown = [summary(cells[c], digits) if c in cells else "-" for c in names]
        ratios = []
        for server in ours:
            for peer in peers:
                if peer not in cells:
                    ratios.append("-")
                    continue
                # The ratio within each round (the two measured seconds apart), then the median over rounds.
                pairs = zip(cells[server.name], cells[peer], strict=True)
                per_round = [theirs / mine if lower_is_better else mine / theirs for mine, theirs in pairs]
                ratios.append(f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})")
        lines.append(f"| {title} | {' | '.join(shown)} | {' | '.join(ratios)} |")

    blanks = " |" * len(ratio_heads)
    row(f"TTFT, {PROMPT_TOKENS}-token prompt, s", ttft, lower_is_better=True, digits=2)
    for level in levels:
        row(f"decode tok/s per stream, {level} streams", {n: decode[n, level] for n in names if (n, level) in decode})
        row(f"aggregate tok/s, {level} streams", {n: aggregate[n, level] for n in names if (n, level) in aggregate})
        counts = [summary(computed[n, level], 0) if (n, level) in computed else "-" for n in names]
        lines.append(f"| prompt tokens computed per stream, {level} streams | {' | '.join(counts)} |{blanks}")
    lines.append(f"| peak RSS, GiB | {' | '.join(f'{peaks[n]:.2f}' for n in names)} |{blanks}")
    if vram:
        lines.append(f"| peak VRAM seen, GiB | {' | '.join(f'{vram.get(n, 0):.2f}' for n in names[:-1])} | - |{blanks}")
    lines.append("")
    for server in ours:
        shares = ", ".join(f"{summary(v)}% at {lv} streams" for (n, lv), v in overhead.items() if n == server.name)
        lines.append(f"Engine time outside llama_decode, {server.name}: {shares}")
    markdown = "\n".join(lines)
    print(markdown)
    (RESULTS / "llama31_8b.md").write_text(markdown + "\n")


if __name__ == "__main__":
    main()
