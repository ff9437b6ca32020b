"""`--strict`: refuse what the hosted model refuses, so that what passes against this server passes in production.

Two kinds of extension are refused (docs/compatibility.md lists every extension and what --strict does with it):
- routes Workers AI does not serve: the short `/ai/run` and `/ai/tokenize` paths, the `/v1` OpenAI prefix, and the
  OpenAI `completions` and `models` routes (the platform's OpenAI-compatible API has chat completions, embeddings
  and responses). They answer 404 as an unknown route does, in the route's own error shape.
- fields: JSON mode (`response_format`), which this model does not offer on the platform: 400 with the platform's
  code 5025 and message (its spelling included); `lora` in an OpenAI body.
Operations routes (/health, /metrics, /openapi.json, the playground) stay: no client of the API calls them.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import is_openai_path
from .contract import RunRequest
from .errors import NO_ROUTE, ApiError, OpenAIError
from .gateway.layer import GATEWAY_URL

JSON_SCHEMA_UNSUPPORTED = 5025
# The platform's words for a model without JSON mode (cloudflare-docs #21316), misspelling and all: client code
# that matches on the message should match here too.
JSON_SCHEMA_UNSUPPORTED_MESSAGE = "This model doesn't suuport JSON Schema."

ACCOUNT_AI = r"/client/v4/accounts/[^/]+/ai"
EXTENSION_ROUTES = [
    (re.compile(r"/ai/run/.*"), "the short /ai/run path: production serves " + "/client/v4/accounts/{id}/ai/run"),
    (re.compile(rf"(/ai|{ACCOUNT_AI})/tokenize/.*"), "prompt tokenization"),
    (re.compile(r"/v1/.*"), "the /v1 prefix: production's OpenAI base URL is /client/v4/accounts/{id}/ai/v1"),
    (re.compile(rf"{ACCOUNT_AI}/v1/completions"), "OpenAI text completions"),
    (re.compile(rf"{ACCOUNT_AI}/v1/models(/.*)?"), "the OpenAI model list"),
]


def extension_route(path: str) -> str | None:
    """What extension `path` is, or None for a route the platform has too (an AI Gateway URL, /v1/{account}/...,
    is the gateway's own)."""
    if GATEWAY_URL.match(path):
        return None
    return next((what for pattern, what in EXTENSION_ROUTES if pattern.fullmatch(path)), None)


class StrictRoutes:
    """In front of the app under --strict: an extension route answers as a route the platform lacks would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        what = extension_route(scope["path"]) if scope["type"] == "http" else None
        if what is None:
            await self.app(scope, receive, send)
            return
        message = f"Could not route to {scope['path']}: {what} is an extension of workers-ai-local, off under --strict"
        if is_openai_path(scope["path"]):  # as the app's own 404 answers there
            response = OpenAIError(404, message, "not_found_error", code=str(NO_ROUTE)).response()
        else:
            response = ApiError(404, NO_ROUTE, message).response()
        await response(scope, receive, send)


def refuse_extensions(run: RunRequest) -> None:
    """Raise the platform's error for a field of `run` that the hosted model does not take."""
    if run.response_format is not None:
        raise ApiError(400, JSON_SCHEMA_UNSUPPORTED, JSON_SCHEMA_UNSUPPORTED_MESSAGE)
