"""The local AI Gateway's cache: a cached answer's time against the same answer computed, and what the cache and the
logs take on disk per 1,000 answers.

One server with `--gateway-dir`, one request at a time. Each round sends a request new to the cache through the
gateway URL with a TTL (computed: MISS), then the same request again (cached: HIT), whole and streamed; the median
of each is reported. The sizes come from the database file after the rounds: its growth per stored answer and per
log entry, scaled to 1,000 (answers of --max-tokens tokens, as the rounds made them).

    .venv/bin/python bench/gateway_cache.py [--model SOURCE|llama31-8b] [--rounds 5] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from local_server import model_source, start_server

GATEWAY = "/v1/bench/cache/workers-ai/@cf/meta/llama-3.1-8b-instruct-fast"
TTL = {"cf-aig-cache-ttl": "3600"}


def timed(client: httpx.Client, body: dict[str, object]) -> tuple[float, str, int]:
    started = time.perf_counter()
    with client.stream("POST", GATEWAY, json=body, headers=TTL) as response:
        size = sum(len(chunk) for chunk in response.iter_raw())
        assert response.status_code == 200, response.status_code
        return time.perf_counter() - started, response.headers["cf-aig-cache-status"], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", default="0", help="the server's --threads (0: its default)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    server_args = ("--gateway-dir", str(folder), "--parallel", "1", "--threads", args.threads)
    proc, url = start_server("--model", model_source(args.model), *server_args)
    times: dict[tuple[bool, str], list[float]] = {}
    sizes: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(args.rounds):
                for stream in (False, True):
                    prompt = f"{uuid.uuid4().hex[:8]}: write a short paragraph about the sea."
                    body = {"prompt": prompt, "max_tokens": args.max_tokens, "stream": stream}
                    for expected in ("MISS", "HIT"):
                        seconds, status, size = timed(client, body)
                        assert status == expected, (status, expected)
                        times.setdefault((stream, status), []).append(seconds)
                    sizes.append(size)
    finally:
        proc.terminate()
        proc.wait()
    database = folder / "gateway.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        answers = db.execute("SELECT COUNT(*) FROM cache").fetchone()[0]
        logs = db.execute("SELECT COUNT(*) FROM logs").fetchone()[0]
        cache_bytes = db.execute(
            "SELECT SUM(LENGTH(key) + LENGTH(gateway) + LENGTH(headers) + LENGTH(body) + LENGTH(chunks)"
            " + LENGTH(usage) + 28) FROM cache"
        ).fetchone()[0]
        log_bytes = db.execute(
            "SELECT SUM(LENGTH(id) + LENGTH(gateway) + LENGTH(provider) + LENGTH(model) + LENGTH(path)"
            " + LENGTH(COALESCE(metadata, '')) + LENGTH(COALESCE(request_content_type, ''))"
            " + LENGTH(COALESCE(response_content_type, '')) + LENGTH(request_type) + LENGTH(request_body)"
            " + LENGTH(response_body) + 64) FROM logs"
        ).fetchone()[0]
    file_bytes = database.stat().st_size
    print(f"model {args.model}, {args.rounds} rounds, max_tokens {args.max_tokens}, threads {args.threads}")
    for (stream, status), values in sorted(times.items()):
        kind = "streamed" if stream else "whole"
        print(f"  {kind:8} {status}: median {statistics.median(values) * 1000:9.1f} ms  ({len(values)} requests)")
    for stream in (False, True):
        ratio = statistics.median(times[(stream, "MISS")]) / statistics.median(times[(stream, "HIT")])
        print(f"  {'streamed' if stream else 'whole'}: a cached answer is {ratio:,.0f}x faster")
    print(f"  answers: median {statistics.median(sizes)} bytes on the wire")
    print(
        f"  rows: {cache_bytes / answers * 1000 / 1e6:.2f} MB of cache per 1,000 answers, "
        f"{log_bytes / logs * 1000 / 1e6:.2f} MB of logs per 1,000 requests (text and blobs, 8 bytes per number)"
    )
    print(f"  file: {file_bytes} bytes for {answers} cached answers and {logs} logs")


if __name__ == "__main__":
    main()
