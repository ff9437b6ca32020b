"""HTTP plumbing every API surface shares: reading a bounded JSON body, and noticing a client that went away."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from starlette.requests import Request

from .engine import Generation, GenerationFailed
from .errors import INTERNAL, MISSING_BODY, TOO_LARGE, ApiError, bad_input

T = TypeVar("T")

# Not a status a server normally sends (nginx's "client closed request"); it only ever reaches the log.
CLIENT_CLOSED = 499
# Workers AI's header for keeping a conversation on the instance that holds its prompt cache.
SESSION_HEADER = "x-session-affinity"
# The deepest nesting of arrays and objects a JSON body may have. Python's parser and everything that walks the
# value afterwards (schema validation, grammar compilation) recurse, and fail near 1,000 levels with a
# RecursionError; no request or adapter config of this API needs more than a few dozen.
MAX_JSON_DEPTH = 128

# A JSON string, escapes included (the unrolled form, so that a long string is one pass of the regex engine).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(text: bytes) -> int:
    """How deep the arrays and objects of `text` nest (of valid JSON; for anything else a number that json.loads
    will refuse anyway), counted without recursion at C speed: strings removed, the rest reduced to brackets."""
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    # "[" 0x5b and "{" 0x7b open, "]" 0x5d and "}" 0x7d close: bit 1 (2) is set in the openers only.
    steps = (codes & 2).astype(np.int32) - 1
    return int(np.cumsum(steps).max())


def parse_json(
    text: bytes, what: str = "the request body", max_depth: int = MAX_JSON_DEPTH, constants: bool = True
) -> object:
    """JSON text as a value, no deeper than `max_depth`; ValueError (its message for the client) otherwise.
    With `constants` False, NaN and Infinity (Python's extension of JSON) are refused too."""
    # Fewer openers than the limit cannot nest past it: most bodies skip the scan.
    depth = json_depth(text) if text.count(b"[") + text.count(b"{") > max_depth else 0
    if depth > max_depth:
        raise ValueError(f"{what} nests arrays and objects {depth} levels deep; the limit is {max_depth}")

    def no_constant(name: str) -> object:
        raise ValueError(f"{what} holds {name}, which is not JSON")

    try:
        return json.loads(text, parse_constant=None if constants else no_constant)
    except RecursionError as exc:  # not reached under the depth limit; kept as a guard, never a 500
        raise ValueError(f"{what} nests too deeply") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc})") from exc
    except ValueError as exc:
        if str(exc).startswith(what):
            raise
        raise ValueError(f"{what} is not valid JSON ({exc})") from exc


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit`, declared or not: a chunked body carries
    no Content-Length, so the bytes themselves are counted as they arrive."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, TOO_LARGE, f"Request is too large: {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, TOO_LARGE, f"Request is too large: over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> object:
    body = await read_body(request, limit)
    if not body.strip():
        raise ApiError(400, MISSING_BODY, "Request is missing headers or body: expected a JSON object")
    try:
        value = parse_json(body)
    except ValueError as exc:
        raise bad_input(f"Error: {exc}") from exc
    # JSON may spell a lone UTF-16 surrogate (\ud800), which no UTF-8 text (nor tokenizer) can hold.
    if b"\\u" in body:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_input("Error: the request body holds a lone surrogate escape, which is not text") from exc
    return value


async def wait_for_disconnect(request: Request) -> None:
    # The body is fully read by now, so the next message the server hands us is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def while_connected(request: Request, work: Awaitable[T]) -> T | None:
    """The result of `work` (a request being prepared and queued), or None, with `work` cancelled, if the client
    goes away first: preparing a long prompt must not outlive the client that sent it."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return None
    return task.result()


async def unless_disconnected(request: Request, generation: Generation, work: Awaitable[T]) -> T | None:
    """The result of `work` (which consumes `generation`), or None, with the generation cancelled, if the client
    goes away first. Raises ApiError (500) if the generation fails."""
    result = None
    try:
        result = await while_connected(request, work)
    except GenerationFailed as exc:
        raise ApiError(500, INTERNAL, str(exc)) from exc
    finally:
        if result is None:  # the client left, or this request was cancelled: stop generating for it
            generation.cancel()
    return result
