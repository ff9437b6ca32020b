"""AI Gateway, locally: a layer around the run path that answers the gateway's requests from its cache or hands them
to the surface that serves the same request without a gateway, and logs each one per gateway.

What it takes (read from cloudflare-docs and workerd's ai-api.ts):
- the Worker binding's `env.AI.run(model, inputs, {gateway: {id, cacheTtl, skipCache, cacheKey, metadata,
  collectLog}})`, which workerd POSTs to `/ai-gateway/run?version=3`; the answer's `cf-aig-log-id` becomes
  `env.AI.aiGatewayLogId`;
- the gateway's own URLs, `/v1/{account_id}/{gateway_id}/workers-ai/{model}` (Workers AI's body and envelope),
  `/v1/{account_id}/{gateway_id}/workers-ai/v1/chat/completions` (and `/completions`) and
  `/v1/{account_id}/{gateway_id}/compat/chat/completions` (OpenAI's shape, the model named
  `workers-ai/@cf/...`), with the request headers cf-aig-cache-ttl, cf-aig-skip-cache, cf-aig-cache-key,
  cf-aig-metadata and cf-aig-collect-log (the old names cf-cache-ttl and cf-skip-cache too).

Every answer carries `cf-aig-cache-status` (HIT or MISS) and, when logged, `cf-aig-log-id`. A cached answer is
the bytes first sent, replayed: a stream comes back as the same SSE events, and no model work is done for it.
Identical requests in flight together each run, as on the platform, whose docs call its cache volatile: "If two
identical requests are sent simultaneously, the first request may not cache in time for the second request to
use it" (ai-gateway/features/caching).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import METHOD_NOT_ALLOWED, TOO_LARGE, ApiError, OpenAIError
from .store import CachedAnswer, GatewayStore, LogEntry, new_log_id

GATEWAY_URL = re.compile(r"^/v1/(?P<account>[^/]+)/(?P<gateway>[^/]+)/(?P<provider>workers-ai|compat)/(?P<rest>.+)$")
BINDING_PATH = "/ai-gateway/run"
MODEL_HEADER = "cf-consn-model-id"
COMPAT_PREFIX = "workers-ai/"
PROVIDER = "workers-ai"
# A custom cache key with no TTL keeps its answer for 5 minutes (ai-gateway/features/caching).
CUSTOM_KEY_TTL = 300
MAX_METADATA = 5  # "only the first five will be saved" (ai-gateway/observability/custom-metadata)
# Headers that belong to one answer, not to the cached one replayed later.
PER_ANSWER = frozenset({"content-length", "date", "server", "cf-ai-req-id", "cf-aig-cache-status", "cf-aig-log-id"})
SSE_END = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Target:
    """Where a gateway request goes: the surface path that serves it, and what the cache and the log call it."""

    gateway: str
    inner_path: str
    endpoint: str  # binding, workers-ai, chat/completions or completions: answers differ in shape between them
    log_path: str
    openai: bool


@dataclass(frozen=True)
class Options:
    skip_cache: bool = False
    ttl: float | None = None
    cache_key: str | None = None
    metadata: dict[str, Any] | None = None
    collect_log: bool = True


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _ttl(name: str, value: object) -> float:
    try:
        ttl = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ttl = -1.0
    if isinstance(value, bool) or not ttl >= 0 or ttl == float("inf"):
        raise ValueError(f"{name} must be a number of seconds, 0 or more, got {value!r}")
    return ttl


def _metadata(name: str, value: object) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{name} must be a JSON object, got {value!r}") from None
    if not isinstance(value, dict) or any(isinstance(v, dict | list) for v in value.values()):
        raise ValueError(f"{name} must be an object of strings, numbers and booleans")
    return dict(list(value.items())[:MAX_METADATA])


def read_options(headers: Headers, gateway: dict[str, Any] | None) -> Options:
    """The request's cf-aig-* headers, and over them the binding's `gateway` options. Raises ValueError, naming
    the bad one."""
    found: dict[str, Any] = {}
    for names, key, parse in (
        (("cf-aig-skip-cache", "cf-skip-cache"), "skip_cache", _flag),
        (("cf-aig-cache-ttl", "cf-cache-ttl"), "ttl", _ttl),
        (("cf-aig-cache-key",), "cache_key", lambda _n, v: v),
        (("cf-aig-metadata",), "metadata", _metadata),
        (("cf-aig-collect-log",), "collect_log", _flag),
    ):
        for name in names:
            if name in headers:
                found[key] = parse(name, headers[name])
                break
    for option, key, parse in (
        ("skipCache", "skip_cache", _flag),
        ("cacheTtl", "ttl", _ttl),
        ("cacheKey", "cache_key", None),
        ("metadata", "metadata", _metadata),
        ("collectLog", "collect_log", _flag),
    ):
        value = (gateway or {}).get(option)
        if value is None:
            continue
        if parse is None:
            if not isinstance(value, str):
                raise ValueError(f"gateway.{option} must be a string")
        else:
            value = parse(f"gateway.{option}", value)
        found[key] = value
    return Options(**found)


def usage_of(body: bytes, stream: bool) -> dict[str, int]:
    """Prompt and completion tokens an answer reports: in its JSON (bare, enveloped or OpenAI's), or in a
    stream's usage event."""
    usage: Any = None
    try:
        if stream:
            for line in body.split(b"\n"):
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    usage = event.get("usage") or usage
        else:
            value = json.loads(body)
            if isinstance(value, dict):
                result = value.get("result")
                usage = value.get("usage") or (result.get("usage") if isinstance(result, dict) else None)
    except ValueError:
        usage = None
    if not isinstance(usage, dict):
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return {name: int(usage.get(name, 0)) for name in ("prompt_tokens", "completion_tokens")}


class GatewayLayer:
    """ASGI middleware: gateway requests in, the surfaces' answers (or cached ones) out, each logged."""

    def __init__(self, app: ASGIApp, store: GatewayStore, served_model: str, default_ttl: float, max_body: int) -> None:
        self.app = app
        self.store = store
        self.served_model = served_model
        self.default_ttl = default_ttl
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        match = GATEWAY_URL.match(path)
        if path != BINDING_PATH and match is None:
            await self.app(scope, receive, send)
            return
        openai = match is not None and (match["provider"] == "compat" or match["rest"].startswith("v1/"))
        try:
            if scope["method"] != "POST":  # a gateway URL is a route of its own, answered as the routes answer
                raise ApiError(405, METHOD_NOT_ALLOWED, f"Method {scope['method']} not allowed here")
            await self._serve(scope, receive, send, match)
        except (ApiError, OpenAIError) as exc:
            if isinstance(exc, ApiError) and openai:
                exc = OpenAIError(exc.status, exc.message, code=str(exc.code))
            await exc.response()(scope, receive, send)

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, 400, "The client went away before its request was read")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                raise ApiError(413, TOO_LARGE, f"Request is too large: over {self.max_body} bytes")
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _bad(openai: bool, message: str) -> Exception:
        return OpenAIError(400, message) if openai else ApiError(400, 400, message)

    def _target(self, scope: Scope, match: re.Match[str] | None, body: Any) -> tuple[Target, str, Any]:
        """Where the request goes, the model it names, and the body the surface is handed."""
        if match is None:
            gateway = (body.get("options") or {}).get("gateway") if isinstance(body, dict) else None
            if not isinstance(gateway, dict) or not isinstance(gateway.get("id"), str) or not gateway["id"]:
                raise ApiError(400, 400, "The AI binding's gateway request names no gateway: options.gateway.id")
            model = Headers(scope=scope).get(MODEL_HEADER, "")
            return Target(gateway["id"], BINDING_PATH, "binding", model, openai=False), model, body
        gateway, provider, rest = match["gateway"], match["provider"], match["rest"]
        if provider == "workers-ai" and not rest.startswith("v1/"):
            model = rest
            return Target(gateway, f"/ai/run/{rest}", PROVIDER, rest, openai=False), model, body
        endpoint = rest.removeprefix("v1/")
        served = ("chat/completions",) if provider == "compat" else ("chat/completions", "completions")
        if endpoint not in served:
            raise ApiError(404, 7003, f"Could not route to {scope['path']}: the gateway serves Workers AI here")
        model = body.get("model") if isinstance(body, dict) else None
        if provider == "compat":
            if not isinstance(model, str) or not model.startswith(COMPAT_PREFIX):
                example = f"{COMPAT_PREFIX}@cf/meta/llama-3.1-8b-instruct-fast"
                message = f"'model' must name a provider and a model, such as {example}"
                raise OpenAIError(400, message, param="model")
            model = model.removeprefix(COMPAT_PREFIX)
            body = {**body, "model": model}
        return Target(gateway, f"/v1/{endpoint}", endpoint, endpoint, openai=True), str(model or ""), body

    def _cache_key(self, target: Target, model: str, body: Any, options: Options) -> str:
        if options.cache_key is not None:
            parts: list[Any] = [target.gateway, target.endpoint, "key", options.cache_key]
        else:
            # The binding's own options (the gateway's, returnRawResponse) change nothing in the answer's bytes.
            inputs = body.get("inputs") if target.endpoint == "binding" else body
            parts = [target.gateway, target.endpoint, model, inputs, self.served_model]
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, match: re.Match[str] | None) -> None:
        started = time.perf_counter()
        created = time.time()
        openai = match is not None and (match["provider"] == "compat" or match["rest"].startswith("v1/"))
        raw = await self._read(receive)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None  # the surface answers it with its own error
        target, model, body = self._target(scope, match, body)
        headers = Headers(scope=scope)
        gateway_options = (body.get("options") or {}).get("gateway") if target.endpoint == "binding" else None
        try:
            options = read_options(headers, gateway_options)
        except ValueError as exc:
            raise self._bad(openai, f"AI Gateway: {exc}") from exc
        ttl = options.ttl if options.ttl is not None else (CUSTOM_KEY_TTL if options.cache_key else self.default_ttl)
        caching = ttl > 0 and body is not None
        key = self._cache_key(target, model, body, options) if caching else ""
        log_id = new_log_id(created) if options.collect_log else None

        def log(status: int, cached: bool, content_type: str | None, response: bytes, usage: dict[str, int]) -> None:
            if log_id is None:
                return
            self.store.add_log(
                LogEntry(
                    id=log_id,
                    gateway=target.gateway,
                    created_at=created,
                    provider=PROVIDER,
                    model=model,
                    path=target.log_path,
                    duration_ms=round((time.perf_counter() - started) * 1000),
                    status_code=status,
                    cached=cached,
                    tokens_in=usage["prompt_tokens"],
                    tokens_out=usage["completion_tokens"],
                    metadata=options.metadata,
                    request_content_type=headers.get("content-type"),
                    response_content_type=content_type,
                    request_type="stream" if _streamed(body) else "json",
                    request_body=raw,
                    response_body=response,
                )
            )

        hit = self.store.lookup(key) if caching and not options.skip_cache else None
        if hit is not None:
            content_type = dict(hit.headers).get("content-type")
            await self._replay(
                hit, target, log_id, send, lambda: log(hit.status, True, content_type, b"".join(hit.chunks), hit.usage)
            )
            return

        inner = raw if body is None or match is None or target.endpoint == "binding" else json.dumps(body).encode()
        status, sent_headers, chunks = 0, [], []
        finished = False

        def finish(completed: bool) -> None:
            """Log the answer, and cache it if it is whole: before its last bytes go out, so that a client that
            asks again (or reads the logs) as soon as it has them finds both."""
            nonlocal finished
            if finished:
                return
            finished = True
            content_type = dict(sent_headers).get("content-type")
            stream = (content_type or "").startswith("text/event-stream")
            whole = b"".join(chunks)
            usage = usage_of(whole, stream)
            log(status if completed else (499 if status else 500), False, content_type, whole, usage)
            if caching and completed and status == 200 and (not stream or whole.endswith(SSE_END)):
                kept = [(k, v) for k, v in sent_headers if k.lower() not in PER_ANSWER]
                self.store.store(key, target.gateway, CachedAnswer(status, kept, chunks, usage), ttl)

        async def capture(message: Message) -> None:
            nonlocal status, sent_headers
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                extra = [(b"cf-aig-cache-status", b"MISS")]
                if log_id is not None:
                    extra.append((b"cf-aig-log-id", log_id.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.append(message["body"])
                if not message.get("more_body", False):
                    finish(completed=True)
            await send(message)

        try:
            await self.app(_inner(scope, target.inner_path, len(inner)), _replaying(inner, receive), capture)
        finally:
            finish(completed=False)  # an answer that never ended (the client left): logged, never cached

    @staticmethod
    async def _replay(
        hit: CachedAnswer, target: Target, log_id: str | None, send: Send, before_end: Callable[[], None]
    ) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in hit.headers]
        content_type = dict(hit.headers).get("content-type")
        if not (content_type or "").startswith("text/event-stream"):
            headers.append((b"content-length", str(sum(len(c) for c in hit.chunks)).encode()))
        headers.append((b"cf-aig-cache-status", b"HIT"))
        if log_id is not None:
            headers.append((b"cf-aig-log-id", log_id.encode()))
        if target.endpoint == "binding":
            headers.append((b"cf-ai-req-id", str(uuid.uuid4()).encode()))
        await send({"type": "http.response.start", "status": hit.status, "headers": headers})
        for chunk in hit.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        before_end()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _streamed(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    inputs = body.get("inputs") if "inputs" in body else body
    return isinstance(inputs, dict) and inputs.get("stream") is True


def _inner(scope: Scope, path: str, length: int) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "path": path, "raw_path": path.encode(), "headers": headers}


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The body already read, then whatever the client sends next (its disconnect, which a surface watches for)."""
    sent = False

    async def receive_again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
