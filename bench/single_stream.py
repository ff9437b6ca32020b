"""Single-stream speed through HTTP SSE, side by side with llama.cpp on the same model, threads and prompt.

Three contenders, interleaved round by round so machine noise hits each alike:
  server     this server, streaming over loopback HTTP (the request a client makes)
  bare       a bare llama_decode loop through llama-cpp-python's low-level API: the ceiling
  high-level llama-cpp-python's Llama.create_completion(stream=True): the obvious alternative

All three decode the same raw prompt greedily for the same number of tokens (the prompt counts upwards, so
the model does not stop early). Reported per contender, median over rounds: time to first token, decode
tokens/s (tokens after the first, over the time after the first) and end-to-end tokens/s.

    .venv/bin/python bench/single_stream.py [--model SOURCE] [--threads N] [--tokens 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import llama_cpp as llama
from local_server import start_server

from workers_ai_local.config import CATALOG_PATH, physical_cores
from workers_ai_local.model_store import ModelStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ROOT = PROJECT_ROOT


@llama.llama_log_callback
def _quiet(_level: int, _text: bytes, _data: ctypes.c_void_p) -> None:
    pass


llama.llama_log_set(_quiet, ctypes.c_void_p(0))

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,"
CTX = 2048


@dataclass
class Run:
    ttft_s: float
    decode_tps: float
    e2e_tps: float
    tokens: int


def measure(started: float, stamps: list[float], tokens: int) -> Run:
    first, last = stamps[0], stamps[-1]
    decode = (tokens - 1) / (last - first) if last > first else float("nan")
    return Run(first - started, decode, tokens / (last - started), tokens)


def run_server(url: str, tokens: int) -> Run:
    body = {"prompt": PROMPT, "raw": True, "stream": True, "temperature": 0, "max_tokens": tokens}
    stamps: list[float] = []
    usage = None
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/ai/run/@cf/meta/llama-3.1-8b-instruct-fast", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "usage" in event:
                usage = event["usage"]
            elif event.get("response"):
                stamps.append(time.perf_counter())
    assert usage is not None, "no usage event"
    return measure(started, stamps, usage["completion_tokens"])


class BareLoop:
    """The minimum any llama.cpp program does per token: decode one token, sample greedily, render it."""

    def __init__(self, path: Path, threads: int) -> None:
        mp = llama.llama_model_default_params()
        self.model = llama.llama_model_load_from_file(str(path).encode(), mp)
        self.vocab = llama.llama_model_get_vocab(self.model)
        cp = llama.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = CTX, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = llama.llama_init_from_model(self.model, cp)
        self.sampler = llama.llama_sampler_init_greedy()
        self.prompt = self.tokenize(PROMPT)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama.llama_token * (len(data) + 8))()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def run(self, tokens: int, prompt_tokens: list[int] | None = None) -> Run:
        """Decode a prompt (PROMPT unless given, up to 512 tokens: one batch) and then `tokens` tokens."""
        llama.llama_memory_clear(llama.llama_get_memory(self.ctx), True)
        piece = ctypes.create_string_buffer(64)
        given = prompt_tokens or self.prompt
        started = time.perf_counter()
        prompt = (llama.llama_token * len(given))(*given)
        llama.llama_decode(self.ctx, llama.llama_batch_get_one(prompt, len(given)))
        stamps = []
        one = (llama.llama_token * 1)()
        for _ in range(tokens):
            token = llama.llama_sampler_sample(self.sampler, self.ctx, -1)
            llama.llama_token_to_piece(self.vocab, token, piece, 64, 0, False)
            stamps.append(time.perf_counter())
            if llama.llama_vocab_is_eog(self.vocab, token):
                break
            one[0] = token
            llama.llama_decode(self.ctx, llama.llama_batch_get_one(one, 1))
        return measure(started, stamps, len(stamps))


class HighLevel:
    def __init__(self, path: Path, threads: int) -> None:
        self.llm = llama.Llama(str(path), n_ctx=CTX, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, tokens: int) -> Run:
        self.llm.reset()
        stamps = []
        started = time.perf_counter()
        for _chunk in self.llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            stamps.append(time.perf_counter())
        return measure(started, stamps, len(stamps))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--threads", type=int, default=physical_cores())
    cli.add_argument("--tokens", type=int, default=128)
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "single_stream.json")
    args = cli.parse_args()

    path = ModelStore(CATALOG_PATH).source(args.model).fetch()
    proc, url = start_server("--model", args.model, "--threads", str(args.threads), "--ctx-size", str(CTX))
    try:
        contenders = {
            "server (HTTP SSE)": lambda n: run_server(url, n),
            "bare llama_decode": BareLoop(path, args.threads).run,
            "create_completion": HighLevel(path, args.threads).run,
        }
        for run in contenders.values():  # warm-up: page in the weights, fill caches
            run(16)
        results: dict[str, list[Run]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                results[name].append(run(args.tokens))
    finally:
        proc.terminate()
        proc.wait()

    bare = statistics.median(r.decode_tps for r in results["bare llama_decode"])
    print(
        f"model {path.name}, {args.threads} threads, {args.tokens} tokens, {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print(f"{'contender':<20} {'TTFT ms':>8} {'decode tok/s':>13} {'e2e tok/s':>10} {'vs bare':>8}")
    summary = {}
    for name, runs in results.items():
        ttft = statistics.median(r.ttft_s for r in runs) * 1000
        decode = statistics.median(r.decode_tps for r in runs)
        e2e = statistics.median(r.e2e_tps for r in runs)
        summary[name] = {"ttft_ms": ttft, "decode_tps": decode, "e2e_tps": e2e, "vs_bare": decode / bare}
        print(f"{name:<20} {ttft:>8.1f} {decode:>13.1f} {e2e:>10.1f} {decode / bare:>7.0%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": path.name,
                "threads": args.threads,
                "tokens": args.tokens,
                "summary": summary,
                "runs": {k: [asdict(r) for r in v] for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
