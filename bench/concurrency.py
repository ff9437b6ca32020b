"""Concurrent streaming clients against this server, llama.cpp's llama-server and llama_cpp.server, in one run.

Same model, threads, slots and prompts for all three; each server is spoken to in its own streaming API:
  this server        POST /ai/run/@cf/meta/llama-3.1-8b-instruct-fast  (Workers AI SSE)
  llama-server       POST /completion                                  (llama.cpp's native SSE), built by
                     bench/build_llama_server.sh from the llama.cpp sources the pinned llama-cpp-python vendors
  llama_cpp.server   POST /v1/completions                              (OpenAI SSE), with its defaults

All three servers stay up; each concurrency level runs every server in turn (the order rotates per level) so
noise on this shared machine lands on all of them alike. Every client streams `--requests` greedy completions
of `--tokens` tokens from prompts that count upwards (the model does not stop early), each client from its own
starting number. Reported per server and concurrency: aggregate completion tokens/s (all tokens over wall
time), time to first token p50/p95, inter-token gap p50, and failed or truncated requests. Writes a Markdown
table, a JSON file and a PNG plot of tokens/s against concurrency to bench/results/.

    .venv/bin/python bench/concurrency.py [--model SOURCE] [--threads N] [--slots 16] [--levels 1,4,8,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from local_server import free_port

from workers_ai_local.config import CATALOG_PATH, physical_cores
from workers_ai_local.model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT_ROOT / "bench" / "results"
LLAMA_SERVER = PROJECT_ROOT / "bench" / ".llama-server" / "bin" / "llama-server"


def counting_prompt(start: int) -> str:
    return ", ".join(str(n) for n in range(start, start + 16)) + ","


@dataclass
class Result:
    tokens: int = 0  # events that carried text (a token that completes no character carries none)
    generated: int | None = None  # tokens generated, as the server reports them, where it does
    prompt_computed: int | None = None  # prompt tokens the server computed (not served from its cache)
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    ok: bool = False
    error: str = ""


@dataclass
class Contender:
    name: str
    command: list[str]
    port: int
    request: Callable[[str, int], tuple[str, dict]]  # prompt, max tokens -> path, body
    text_of: Callable[[dict], str | None]  # an SSE event's text, or None when it carries none
    is_end: Callable[[str], bool]  # the raw data line that closes a stream
    health: str = "/health"  # answers 200 once the server is ready
    # (tokens generated, prompt tokens computed) from an event that reports them, else None
    counts_of: Callable[[dict], tuple[int, int] | None] = lambda event: None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path) -> None:
        self.process = subprocess.Popen(self.command, cwd=PROJECT_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process and self.process.poll() is None, f"{self.name} exited"
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not become ready")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def stream(self, client: httpx.Client, prompt: str, tokens: int) -> Result:
        path, body = self.request(prompt, tokens)
        result = Result()
        started = time.perf_counter()
        last = None
        try:
            with client.stream("POST", self.url + path, json=body, timeout=600) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}"
                    return result
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if self.is_end(data):
                        result.ok = True
                        if data.startswith("{"):  # llama-server's closing event may carry text too
                            self._count(json.loads(data), result, started, last)
                        break
                    last = self._count(json.loads(data), result, started, last)
        except httpx.HTTPError as exc:
            result.error = type(exc).__name__
        return result

    def _count(self, event: dict, result: Result, started: float, last: float | None) -> float | None:
        if counts := self.counts_of(event):
            result.generated, result.prompt_computed = counts
        text = self.text_of(event)
        if not text:
            return last
        now = time.perf_counter()
        if last is None:
            result.ttft = now - started
        else:
            result.gaps.append(now - last)
        result.tokens += 1
        return now


def usage_counts(event: dict) -> tuple[int, int] | None:
    """This server's counts, from the usage its last event carries."""
    usage = event.get("usage")
    if not usage:
        return None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return usage["completion_tokens"], usage["prompt_tokens"] - cached


def in_one_pool(ours: Contender, name: str, kv_size: int = 0) -> Contender:
    """This server again on a port of its own, in the pool layout (--kv-size cells, else its own default)."""
    port = free_port()
    command = [*ours.command, "--kv-layout", "pool", *(["--kv-size", str(kv_size)] if kv_size else [])]
    command[command.index("--port") + 1] = str(port)
    return dataclasses.replace(ours, name=name, command=command, port=port)


def contenders(model_path: Path, source: str, threads: int, slots: int, ctx: int) -> Iterator[Contender]:
    ours = free_port()
    yield Contender(
        "this server",
        [
            sys.executable,
            "-m",
            "workers_ai_local",
            "--port",
            str(ours),
            "--model",
            source,
            "--threads",
            str(threads),
            "--parallel",
            str(slots),
            "--ctx-size",
            str(ctx),
            "--max-queue",
            "0",
            "--log-level",
            "warning",
        ],
        ours,
        lambda p, n: (
            "/ai/run/@cf/meta/llama-3.1-8b-instruct-fast",
            {"prompt": p, "raw": True, "stream": True, "temperature": 0, "max_tokens": n},
        ),
        lambda e: e.get("response"),
        lambda d: d == "[DONE]",
        counts_of=usage_counts,
    )
    if LLAMA_SERVER.exists():
        port = free_port()
        yield Contender(
            "llama-server",
            [
                str(LLAMA_SERVER),
                "-m",
                str(model_path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(slots),
                "-c",
                str(slots * ctx),
                "--no-webui",
            ],
            port,
            lambda p, n: (
                "/completion",
                {"prompt": p, "n_predict": n, "temperature": 0, "stream": True, "cache_prompt": True},
            ),
            lambda e: e.get("content"),
            lambda d: d.startswith("{") and json.loads(d).get("stop") is True,
            counts_of=lambda e: (e["timings"]["predicted_n"], e["timings"]["prompt_n"]) if "timings" in e else None,
        )
    else:
        print(f"skipping llama-server: {LLAMA_SERVER} missing (run bench/build_llama_server.sh)", file=sys.stderr)
    port = free_port()
    yield Contender(
        "llama_cpp.server",
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--n_ctx",
            str(ctx),
        ],
        port,
        lambda p, n: ("/v1/completions", {"prompt": p, "max_tokens": n, "temperature": 0, "stream": True}),
        lambda e: (e.get("choices") or [{}])[0].get("text"),
        lambda d: d == "[DONE]",
        health="/v1/models",
    )


def start_all(contenders: list[Contender], log_prefix: str) -> None:
    """Start every contender (logs in RESULTS/<log_prefix><name>.log), then wait until each is ready."""
    for contender in contenders:
        contender.start(RESULTS / f"{log_prefix}{contender.name.replace(' ', '_')}.log")
    for contender in contenders:
        contender.wait_ready()


def run_clients(count: int, client: Callable[[int], None]) -> float:
    """Run `client(0)` .. `client(count - 1)` at once, each in a thread of its own; returns the wall seconds."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def engine_seconds(contender: Contender) -> tuple[float, float]:
    """This server's cumulative engine working time and the part of it inside llama_decode (its /metrics)."""
    values = {}
    for line in httpx.get(contender.url + "/metrics").text.splitlines():
        if line.startswith(("workers_ai_engine_busy_seconds ", "workers_ai_engine_decode_seconds ")):
            name, value = line.split()
            values[name] = float(value)
    return values["workers_ai_engine_busy_seconds"], values["workers_ai_engine_decode_seconds"]


def outside_decode_percent(contender: Contender, since: tuple[float, float]) -> float:
    """The engine's own share of its working time since `since` (an earlier engine_seconds): all that is not
    llama_decode, in percent."""
    busy, inside = (now - then for now, then in zip(engine_seconds(contender), since, strict=True))
    return 100 * (busy - inside) / busy


def run_level(contender: Contender, concurrency: int, requests: int, tokens: int, first: int = 1) -> dict:
    results: list[Result] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        with httpx.Client() as http:
            for r in range(requests):
                result = contender.stream(http, counting_prompt(first + 1000 * index + 100 * r), tokens)
                with lock:
                    results.append(result)

    wall = run_clients(concurrency, client)
    ttfts = sorted(r.ttft for r in results if r.ttft is not None)
    gaps = [g for r in results for g in r.gaps]
    return {
        "tokens_per_s": sum(r.tokens for r in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
        "ttft_p95_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else None,
        "failed": sum(1 for r in results if not r.ok),
        "truncated": sum(1 for r in results if r.ok and r.tokens < tokens),
        "requests": len(results),
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--threads", type=int, default=physical_cores())
    cli.add_argument("--slots", type=int, default=16, help="--parallel / -np for the batching servers")
    cli.add_argument("--ctx", type=int, default=512, help="context per slot")
    cli.add_argument("--levels", default="1,4,8,16")
    cli.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    cli.add_argument("--tokens", type=int, default=128)
    cli.add_argument("--without", action="append", default=[], help="leave out a contender, e.g. llama_cpp.server")
    cli.add_argument("--server-args", default="", help="more flags for this server, e.g. '--kv-layout slots'")
    cli.add_argument("--pool-too", action="store_true", help="also this server in the pool layout, taking turns")
    args = cli.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    model_path = ModelStore(CATALOG_PATH).source(args.model).fetch()
    RESULTS.mkdir(parents=True, exist_ok=True)
    servers = [
        s for s in contenders(model_path, args.model, args.threads, args.slots, args.ctx) if s.name not in args.without
    ]
    for s in servers:
        if s.name == "this server":
            s.command += args.server_args.split()
    if args.pool_too:
        servers.insert(1, in_one_pool(servers[0], "this server, pool"))
    try:
        start_all(servers, "")
        for s in servers:  # warm-up, on a prompt no measured request uses
            run_level(s, 1, 1, 16, first=500_000)
        runs: dict[str, dict[int, list[dict]]] = {s.name: {} for s in servers}
        for i, level in enumerate(levels):
            order = servers[i % len(servers) :] + servers[: i % len(servers)]
            for s in order:
                # Prompts no earlier level used, the same for every server: a server's prompt cache (llama-server
                # keeps prompts in RAM) must not turn a repeated level into a measure of caching.
                before = engine_seconds(s) if s.name.startswith("this server") else None
                run = run_level(s, level, args.requests, args.tokens, first=1 + 1_000_000 * i)
                if before:
                    run["outside_decode_pct"] = outside_decode_percent(s, before)
                runs[s.name].setdefault(level, []).append(run)
                print(f"{s.name:<17} c={level:<3} {run}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()

    # A level listed several times (e.g. --levels 8,16,8,16) is reported by its median run, with the range.
    table = {
        name: {level: sorted(rows, key=lambda r: r["tokens_per_s"])[len(rows) // 2] for level, rows in levels_.items()}
        for name, levels_ in runs.items()
    }
    spread = {
        name: {
            level: (min(r["tokens_per_s"] for r in rows), max(r["tokens_per_s"] for r in rows))
            for level, rows in lv.items()
        }
        for name, lv in runs.items()
    }
    header = (
        f"model {model_path.name}, {args.threads} threads, {args.slots} slots, {args.tokens} tokens per request, "
        f"{args.requests} requests per client"
    )
    lines = [
        header,
        "",
        "| server | clients | tokens/s median | range | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | failed | truncated |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in table.items():
        for level, row in rows.items():
            lines.append(
                f"| {name} | {level} | {fmt(row['tokens_per_s'])} | "
                f"{fmt(spread[name][level][0])}-{fmt(spread[name][level][1])} | {fmt(row['ttft_p50_ms'])} | "
                f"{fmt(row['ttft_p95_ms'])} | {fmt(row['itl_p50_ms'], 2)} | {row['failed']} | "
                f"{row['truncated']}/{row['requests']} |"
            )
    for name in (n for n in runs if n.startswith("this server")):
        for level, rows in runs[name].items():
            shares = sorted(r["outside_decode_pct"] for r in rows)
            lines.append(
                f"\n{name}, {level} clients: engine time outside llama_decode {statistics.median(shares):.1f}% "
                f"({shares[0]:.1f}-{shares[-1]:.1f}%)"
            )
            peer = runs.get("llama-server", {}).get(level)
            if peer and len(peer) == len(rows):  # the runs of a repeated level, in the order they took turns
                ratios = [r["tokens_per_s"] / q["tokens_per_s"] for r, q in zip(rows, peer, strict=True)]
                lines.append(
                    f"{name} / llama-server, {level} clients, run by run: "
                    + ", ".join(f"{x:.2f}x" for x in ratios)
                    + f" (median {statistics.median(ratios):.2f}x)"
                )
    markdown = "\n".join(lines)
    print(markdown)
    (RESULTS / "concurrency.md").write_text(markdown + "\n")
    (RESULTS / "concurrency.json").write_text(json.dumps({"settings": vars(args), "results": runs}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in table.items():
        ax.plot(list(rows), [r["tokens_per_s"] for r in rows.values()], marker="o", label=name)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate completion tokens/s")
    ax.set_xticks(levels)
    ax.set_title(header, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "concurrency.png", dpi=120)
    print(f"\nwrote {RESULTS / 'concurrency.md'}, {RESULTS / 'concurrency.png'}")


if __name__ == "__main__":
    main()
