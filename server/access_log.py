"""One log line per request (method, path, status, tokens, time taken), and its metrics."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import ServerMetrics

log = logging.getLogger("workers_ai_local.access")


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

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
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
                scope["path"],
                status,
                tokens,
                time.perf_counter() - started,
            )
