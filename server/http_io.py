"""HTTP plumbing every API surface shares: reading a bounded JSON body, and noticing a client that went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from .engine import Generation, GenerationFailed
from .errors import INTERNAL, MISSING_BODY, TOO_LARGE, ApiError, bad_input

T = TypeVar("T")

# Not a status a server normally sends (nginx's "client closed request"); it only ever reaches the log.
CLIENT_CLOSED = 499
# Workers AI's header for keeping a conversation on the instance that holds its prompt cache.
SESSION_HEADER = "x-session-affinity"


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
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_input(f"Error: the request body is not valid JSON ({exc})") from exc
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
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            generation.cancel()
            task.cancel()
    if not task.done() or task.cancelled():
        return None
    try:
        return task.result()
    except GenerationFailed as exc:
        raise ApiError(500, INTERNAL, str(exc)) from exc
