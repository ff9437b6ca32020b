"""The Worker binding: what a Worker's `env.AI.run(model, inputs, options)` sends, answered as the real binding's
backend answers it, so Miniflare, vitest and the shipped `wrangler dev` entrypoint use this server unchanged.

workerd's Ai binding POSTs `{"inputs", "options"}` to `https://workers-binding.ai/run?version=3` (or
`/ai-gateway/run` when `options.gateway` is set, which server/gateway serves around this route) with the model in
`cf-consn-model-id`; `env.AI.models()` GETs `/ai-api/models/search`. The shipped entrypoint (workers/) sends that
request here directly. Miniflare's remote proxy instead POSTs it to its connection string and names the inner URL in
`MF-URL`; `MiniflareProxy` unwraps that at the edge, so routing, auth, the log and metrics see the binding's own
request.

It is the same run path as `/ai/run`: a JSON success is the bare result (content type exactly `application/json`,
or workerd hands the Worker a stream), a stream is Workers AI's SSE, an error is the envelope whose `errors[0]` the
binding raises as `InferenceUpstreamError: <code>: <message>`, and every answer names its request in
`cf-ai-req-id` (the Worker's `env.AI.lastRequestId`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import NO_ROUTE, NO_SUCH_MODEL, ApiError, bad_input
from ..http_io import read_json
from ..run_options import RunOptions
from ..text_generation import TextGeneration
from .catalog import BINDING_MODELS_PATH as MODELS_PATH
from .workers_ai import answer_run

log = logging.getLogger("workers_ai_local.binding")

MODEL_HEADER = "cf-consn-model-id"
REQUEST_ID_HEADER = "cf-ai-req-id"
RUN_PATHS = ("/run", "/ai-gateway/run")
NOT_IMPLEMENTED = 7000

# Miniflare's remote proxy: the URL workerd fetched, each original header under a prefix, and, on the answer,
# the mark that tells Miniflare 5 the response is the backend's own (not an access page to explain away).
PROXY_URL_HEADER = "mf-url"
PROXY_HEADER_PREFIX = b"mf-header-"
PROXY_BINDING = "mf-binding"
FORWARDED_HEADER = ("mf-forwarded-response", "true")
# Miniflare forwards no credentials (user:password@ in the connection string is dropped), but it keeps the
# connection string's path: with API tokens on, the string is http://HOST:PORT/binding/<token>.
TOKEN_PREFIX = "/binding/"


class BindingRoutes:
    def __init__(self, generation: TextGeneration, max_body: int) -> None:
        self.generation = generation
        self.max_body = max_body

    def routes(self) -> list[Route]:
        return [
            *(Route(path, self.run, methods=["POST"]) for path in RUN_PATHS),
            # Miniflare's requests carry MF-URL and are unwrapped before they get here (MiniflareProxy).
            Route("/", self.not_forwarded, methods=["POST"]),
        ]

    async def not_forwarded(self, request: Request) -> Response:
        message = f"POST / takes the AI binding's requests as Miniflare forwards them, with {PROXY_URL_HEADER}"
        return ApiError(400, NO_SUCH_MODEL, message).response()

    async def run(self, request: Request) -> Response:
        try:
            response = await self._run(request)
        except ApiError as exc:
            response = exc.response()
        response.headers[REQUEST_ID_HEADER] = str(uuid.uuid4())
        return response

    async def _run(self, request: Request) -> Response:
        inputs, options = self._unwrap(await read_json(request, self.max_body))
        model = request.headers.get(MODEL_HEADER)
        if not model:
            raise ApiError(400, NO_SUCH_MODEL, f"No such model: the {MODEL_HEADER} header is missing")
        # JSONResponse's content type is exactly `application/json`: with a charset, workerd streams the body.
        run = self.generation.parse(model, inputs)
        return await answer_run(self.generation, request, run, JSONResponse, RunOptions.from_body({"options": options}))

    @staticmethod
    def _unwrap(body: object) -> tuple[object, dict[str, Any]]:
        if not isinstance(body, dict) or "inputs" not in body:
            raise bad_input('Error: the AI binding\'s body is {"inputs": {...}, "options": {...}}')
        options = body.get("options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise bad_input("Error: '/options' must be an object")
        return body["inputs"], options


class MiniflareProxy:
    """Turns a request forwarded by Miniflare's remote proxy back into the binding's own request: the path and
    query of `MF-URL`, the `MF-Header-*` headers un-prefixed, and a token from the connection string's path as a
    bearer token. Its answers carry `MF-Forwarded-Response`. Everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # Miniflare 4 also opens a websocket to the connection string for RPC that text generation never uses.
        if headers.get("upgrade", "").lower() == "websocket" and PROXY_BINDING in _query_names(scope):
            message = "The AI binding's RPC session is not offered: env.AI.run needs none"
            await ApiError(501, NOT_IMPLEMENTED, message).response()(scope, receive, send)
            return
        inner = headers.get(PROXY_URL_HEADER)
        url = urlsplit(inner) if inner is not None else None
        # Only the binding's own calls are unwrapped (POST a run, GET the models): any other method is the
        # outer route's to answer, so that its 405 names the methods of the path the client addressed.
        if url is None or scope["method"] != ("GET" if url.path == MODELS_PATH else "POST"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        token = unquote(path[len(TOKEN_PREFIX) :]) if path.startswith(TOKEN_PREFIX) else None
        if (path != "/" and token is None) or url.path not in (*RUN_PATHS, MODELS_PATH):
            message = f"Could not route to {url.path}: the AI binding calls {', '.join(RUN_PATHS)} or {MODELS_PATH}"
            await ApiError(404, NO_ROUTE, message).response()(scope, receive, send)
            return
        await self.app(_inner_scope(scope, url.path, url.query, token), receive, _marked(send))


def _query_names(scope: Scope) -> set[str]:
    return {name.lower() for name in parse_qs(scope.get("query_string", b"").decode("latin-1"))}


def _inner_scope(scope: Scope, path: str, query: str, token: str | None) -> Scope:
    transport = {b"host", b"content-length", b"transfer-encoding"}
    headers = [(name, value) for name, value in scope["headers"] if name in transport]
    for name, value in scope["headers"]:
        if name.startswith(PROXY_HEADER_PREFIX) and name[len(PROXY_HEADER_PREFIX) :] not in transport:
            headers.append((name[len(PROXY_HEADER_PREFIX) :], value))
    if token is not None:
        headers = [(n, v) for n, v in headers if n != b"authorization"]
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return {**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode(), "headers": headers}


def _marked(send: Send) -> Send:
    async def send_marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message).append(*FORWARDED_HEADER)
        await send(message)

    return send_marked


class UpgradeProbeFilter(logging.Filter):
    """Miniflare 4 opens that websocket once per Worker request; uvicorn, told to serve no websockets (`ws="none"`),
    would warn twice each time before handing the request on (to the 501 above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unsupported upgrade request") or "No supported WebSocket library" in message)
