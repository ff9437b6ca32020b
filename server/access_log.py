"""One log line per request: method, path, status, tokens and time taken."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("server.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

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
            tokens = ""
            if generation is not None:
                tokens = f" prompt_tokens={generation.prompt_tokens} completion_tokens={generation.completion_tokens}"
            log.info(
                "%s %s %d%s %.3fs",
                scope["method"],
                scope["path"],
                status,
                tokens,
                time.perf_counter() - started,
            )
