"""One log line per request (method, path, status, tokens, time taken), and its metrics.

A path is logged as the client can be trusted with it: control characters escaped (a decoded `%0d%0a` would
otherwise start a forged log line) and the token of a `/binding/<token>` connection string redacted, on every
path, whether or not the request was unwrapped as the binding's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import OUT_OF_CAPACITY, ApiError
from .metrics import ServerMetrics
from .surfaces.openai import error_response

log = logging.getLogger("workers_ai_local.access")

# C0 and C1 control characters, DEL, and the backslash that introduces our escapes (so that an escape in the log is
# never ambiguous with the same text sent literally).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_BINDING_TOKEN = re.compile(r"^/binding/.+", re.DOTALL)
REDACTED_BINDING = "/binding/<redacted>"


def loggable_path(path: str) -> str:
    """`path` safe to write into a log line: no secret, no line breaks or other control characters."""
    path = _BINDING_TOKEN.sub(REDACTED_BINDING, path)
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", path)


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering
        answered = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            # Only uvicorn cancels a request's task: at shutdown, past --shutdown-timeout. That ends the request
            # (its generation is cancelled on the way out), with an answer if none began (a client still sending
            # its body gets a 503), logged below rather than as a traceback.
            if not answered:
                stopping = ApiError(503, OUT_OF_CAPACITY, "The server is shutting down")
                await error_response(scope["path"], stopping)(scope, receive, send_and_note)
        finally:
            # The run handler leaves its Generation in request.state, which lives in the scope.
            generation = scope.get("state", {}).get("generation")
            self.metrics.observe(status, generation)
            tokens = ""
            if generation is not None:
                tokens = (
                    f" prompt_tokens={generation.prompt_tokens} cached_tokens={generation.cached_tokens}"
                    f" completion_tokens={generation.completion_tokens}"
                )
                if generation.token_gaps:  # the longest a token kept the client waiting once the stream had started
                    tokens += f" longest_token_gap={max(generation.token_gaps):.3f}s"
            log.info(
                "%s %s %d%s %.3fs",
                scope["method"],
                loggable_path(scope["path"]),
                status,
                tokens,
                time.perf_counter() - started,
            )
