"""Replay of recorded streams, byte for byte: one server plays the Cloudflare API (the local model), a second records
through it (`--upstream ... --record DIR`), a third replays (`--replay DIR`). Each stream is recorded once and
replayed several times; every replay is compared with the bytes the client got while recording.

Reports, per stream size: the events and bytes of each stream, how many replays were identical, and the median
time of the whole stream computed (through the recorder) against replayed, with the replaying server's model
work (completion tokens, which should be 0).

    .venv/bin/python bench/replay_stream.py [--model SOURCE] [--streams 4] [--replays 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from local_server import model_source, start_server

RUN = "/client/v4/accounts/bench/ai/run/@cf/meta/llama-3.1-8b-instruct-fast"


def timed_stream(client: httpx.Client, url: str, body: dict) -> tuple[float, bytes]:
    started = time.perf_counter()
    with client.stream("POST", url + RUN, json=body) as response:
        response.raise_for_status()
        data = b"".join(response.iter_raw())
    return time.perf_counter() - started, data


def completion_tokens(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("workers_ai_completion_tokens_total "):
            return float(line.split()[1])
    return 0.0


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--model", default="smollm2-135m-instruct")
    cli.add_argument("--streams", type=int, default=4)
    cli.add_argument("--replays", type=int, default=5)
    cli.add_argument("--max-tokens", type=int, default=64)
    args = cli.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="replay-bench-"))
    upstream, upstream_url = start_server("--model", model_source(args.model), "--parallel", "1")
    recorder, recorder_url = start_server(
        "--upstream", f"{upstream_url}/client/v4/accounts/x", "--record", str(folder), "--ctx-size", "256"
    )
    replayer, replayer_url = start_server("--replay", str(folder), "--ctx-size", "256")
    computed: list[float] = []
    replayed: list[float] = []
    identical = total = events = size = 0
    try:
        with httpx.Client(timeout=600) as client:
            for n in range(args.streams):
                body = {"prompt": f"Story {n}: tell me about the sea.", "max_tokens": args.max_tokens, "stream": True}
                seconds, recorded = timed_stream(client, recorder_url, body)
                computed.append(seconds)
                events += recorded.count(b"\n\n")
                size += len(recorded)
                for _ in range(args.replays):
                    seconds, again = timed_stream(client, replayer_url, body)
                    replayed.append(seconds)
                    identical += again == recorded
                    total += 1
        work = completion_tokens(replayer_url)
    finally:
        for proc in (replayer, recorder, upstream):
            proc.terminate()
            proc.wait()
    print(f"model {args.model}, {args.streams} streams of up to {args.max_tokens} tokens, {args.replays} replays each")
    print(f"recorded: {events} events, {size} bytes in {len(list(folder.glob('*.json')))} files")
    print(f"replays identical to the recorded bytes: {identical}/{total}")
    print(
        f"median stream time: computed {statistics.median(computed):.3f} s, "
        f"replayed {statistics.median(replayed) * 1000:.1f} ms; replaying server's completion tokens: {work:.0f}"
    )


if __name__ == "__main__":
    main()
