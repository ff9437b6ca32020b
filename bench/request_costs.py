"""What each hostile request of issue 28 costs a running server: status, seconds and the server's RSS after it.

Against a server already started (loopback), e.g.
    .venv/bin/python -m workers_ai_local --port 8787 --ctx-size 1024 --kv-layout slots --parallel 2 --max-queue 2 &
    .venv/bin/python bench/request_costs.py http://127.0.0.1:8787 --pid $! [--case NAME ...]

Each request is given --timeout seconds (a request that used to run forever shows as a timeout). Cases run one after
another; `--list` names them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "@cf/meta/llama-3.1-8b-instruct-fast"
RUN = f"/ai/run/{MODEL}"


def json_mode(schema: Any, max_tokens: int = 64) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "json"}],
        "max_tokens": max_tokens,
        "response_format": {"type": "json_schema", "json_schema": schema},
    }


def with_tool(parameters: Any) -> dict[str, Any]:
    tool = {"name": "f", "description": "d", "parameters": parameters}
    return {"messages": [{"role": "user", "content": "x"}], "max_tokens": 32, "tools": [tool]}


def array_of(**bounds: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {"a": {"type": "array", "description": "a", **bounds}}, "required": ["a"]}


def defs(definitions: dict[str, Any], ref: str) -> dict[str, Any]:
    return {"$defs": definitions, "type": "object", "properties": {"x": {"$ref": ref}}, "required": ["x"]}


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


TURNS = "<|im_start|>user\nhi<|im_end|>\n"
CASES: dict[str, tuple[str, Any]] = {
    "minItems_2^63": (RUN, json_mode(array_of(minItems=2**63))),
    "minItems_1e6": (RUN, json_mode(array_of(minItems=1_000_000))),
    "tool_minItems_1e6": (RUN, with_tool(array_of(minItems=1_000_000))),
    "nested_minItems_1000x1000": (
        RUN,
        json_mode(array_of(minItems=1000, items={"type": "array", "minItems": 1000, "items": {"type": "integer"}})),
    ),
    "enum_100k": (RUN, json_mode({"type": "object", "properties": {"a": {"enum": list(range(100_000))}}})),
    "nested_100": (RUN, json_mode(nested(100))),
    "ref_list_index": (
        RUN,
        json_mode(
            {
                "type": "object",
                "properties": {"a": {"anyOf": [{"type": "integer"}]}, "b": {"$ref": "#/properties/a/anyOf/0"}},
                "required": ["b"],
            },
            max_tokens=1,
        ),
    ),
    "ref_percent": (RUN, json_mode(defs({"a b": {"type": "integer"}}, "#/$defs/a%20b"), max_tokens=1)),
    "ref_true": (RUN, json_mode(defs({"t": True}, "#/$defs/t"), max_tokens=1)),
    "ref_anchor": (RUN, json_mode(defs({"a": {"$anchor": "foo", "type": "integer"}}, "#foo"))),
    "ref_self_anyOf": (
        RUN,
        json_mode(defs({"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]}}, "#/$defs/a")),
    ),
    "tool_defs_str": (RUN, with_tool({"type": "object", "$defs": "str", "properties": {}})),
    "lora_300": (RUN, {"prompt": "x", "max_tokens": 1, "lora": "a" * 300}),
    "completions_empty": ("/v1/completions", {"model": MODEL, "prompt": [""], "max_tokens": 1}),
    "nan_temperature": (RUN, '{"prompt": "x", "max_tokens": 1, "temperature": NaN}'),
    "nan_top_p_openai": (
        "/v1/chat/completions",
        '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "top_p": NaN}',
    ),
    "messages_100k": (RUN, {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 1}),
    "turns_7x4300": (RUN, {"messages": [{"role": "user", "content": TURNS * 4300}] * 7, "max_tokens": 1}),
    "raw_16000_turns": ("/v1/completions", {"model": MODEL, "prompt": TURNS * 16000, "max_tokens": 1}),
}


def rss_mb(pid: int | None) -> str:
    if pid is None:
        return "-"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return f"{int(line.split()[1]) // 1024} MB"
    return "-"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("url", nargs="?", default="http://127.0.0.1:8787")
    cli.add_argument("--case", action="append", dest="cases", help="a case to run (repeat; default: all)")
    cli.add_argument("--pid", type=int, help="the server's process id, for its RSS")
    cli.add_argument("--timeout", type=float, default=60)
    cli.add_argument("--list", action="store_true")
    args = cli.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    for name in args.cases or CASES:
        path, body = CASES[name]
        content = body if isinstance(body, str) else json.dumps(body)
        started = time.perf_counter()
        try:
            response = httpx.post(
                args.url + path, content=content, headers={"content-type": "application/json"}, timeout=args.timeout
            )
            status, text = str(response.status_code), response.text[:160]
        except httpx.TimeoutException:
            status, text = "timeout", ""
        seconds = time.perf_counter() - started
        print(f"{name:26} {status:8} {seconds:7.2f} s  rss {rss_mb(args.pid):>7}  {text}", flush=True)


if __name__ == "__main__":
    main()
