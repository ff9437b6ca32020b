"""API tokens: off by default for local use; when configured, every API route needs `Authorization: Bearer`.

Tokens are compared in constant time. Failures answer in the shape the route's clients parse: Cloudflare's
envelope (code 10000) on Workers AI routes, OpenAI's error object on the OpenAI-compatible ones. Health, the
playground page and the OpenAPI document stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from pathlib import Path

from starlette.datastructures import Headers
from starlette.requests import Request
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


def cache_scope(request: Request) -> str | None:
    """Whose cached prompts a request may reuse: with several tokens, its token's (see TokenCheck); else anyone's."""
    return request.scope.get("state", {}).get(CACHE_SCOPE)


CACHE_SCOPE = "cache_scope"


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/ai/v1/" in path


class TokenCheck:
    def __init__(self, app: ASGIApp, tokens: Iterable[str]) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        # With several tokens, each token's requests reuse only their own cached prompts: otherwise one client could
        # test guesses of another's prompt by `cached_tokens` or by timing. The scope is a keyed hash of the token
        # (a key of this process), never the token itself, since it may reach logs and the engine's state. With one
        # token (or none) every request shares one scope, and reuses as before.
        self._scope_key = secrets.token_bytes(32)

    def _match(self, presented: str) -> bytes | None:
        # Every configured token is compared, so timing tells neither which one nor how much matched.
        candidate = presented.encode()
        matches = [hmac.compare_digest(candidate, token) for token in self.tokens]
        return self.tokens[matches.index(True)] if any(matches) else None

    def _scope(self, token: bytes) -> str | None:
        if len(self.tokens) < 2:
            return None
        return hmac.new(self._scope_key, token, hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def _open(scope: Scope) -> bool:
        return scope["path"] in OPEN_PATHS and scope["method"] in OPEN_METHODS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or self._open(scope):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        token = self._match(presented.strip()) if scheme.lower() == "bearer" and presented else None
        if token is not None:
            scoped = self._scope(token)
            if scoped is not None:
                scope.setdefault("state", {})[CACHE_SCOPE] = scoped
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
