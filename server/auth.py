"""API tokens: off by default for local use; when configured, every API route needs `Authorization: Bearer`.

Tokens are compared in constant time. Failures answer in the shape the route's clients parse: Cloudflare's
envelope (code 10000) on Workers AI routes, OpenAI's error object on the OpenAI-compatible ones. Health, the
playground page and the OpenAPI document stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, OpenAIError

AUTH_ERROR = 10000
# Open to GET alone: `POST /` is the Worker binding's endpoint, which runs the model like any API route.
OPEN_PATHS = frozenset({"/", "/health", "/openapi.json"})
OPEN_METHODS = frozenset({"GET", "HEAD"})


def load_tokens(tokens: str, token_file: str) -> list[str]:
    """Comma-separated tokens, plus one per line from a file (blank lines and # comments skipped)."""
    found = [t.strip() for t in tokens.split(",") if t.strip()]
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/ai/v1/" in path


class TokenCheck:
    def __init__(self, app: ASGIApp, tokens: Iterable[str]) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]

    def _valid(self, presented: str) -> bool:
        # Every configured token is compared, so timing tells neither which one nor how much matched.
        candidate = presented.encode()
        matches = [hmac.compare_digest(candidate, token) for token in self.tokens]
        return any(matches)

    @staticmethod
    def _open(scope: Scope) -> bool:
        return scope["path"] in OPEN_PATHS and scope["method"] in OPEN_METHODS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or self._open(scope):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and presented and self._valid(presented.strip()):
            await self.app(scope, receive, send)
            return
        status = 403 if presented else 401
        if is_openai_path(scope["path"]):
            message = "Incorrect API key provided" if presented else "Missing bearer token"
            response = OpenAIError(status, message, code="invalid_api_key").response()
        else:
            response = ApiError(status, AUTH_ERROR, "Authentication error").response()
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
