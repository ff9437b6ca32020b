"""Middleware inside Ray Serve's HTTP proxy, in front of every replica (Serve calls `middlewares()` in each proxy,
named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH; see cluster.environment).

- RayAnswers: Ray's own answers are text/plain (a full queue, no replica, a replica that died, a timeout); they
  become our error envelope, or OpenAI's error object on the OpenAI routes. A stream its replica never finished
  ends with the same final error event a failed generation gets, not a cut connection.
- ClusterEndpoints: GET /health and /metrics for every replica, from the reports Serve collects from them
  (deployment.EngineReplica.record_routing_stats), without occupying one.
- PrefixKeys: reads a request's body, gives the router its prompt-prefix keys in a header, and replays the body;
  a request asking rejectIfBusy while every replica is full is refused there (busy.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers_ai_local import sse
from workers_ai_local.auth import TokenCheck, is_openai_path, load_tokens
from workers_ai_local.config import load_settings
from workers_ai_local.errors import INTERNAL, OUT_OF_CAPACITY, ApiError
from workers_ai_local.ray_serve import busy, prefixes
from workers_ai_local.ray_serve.cluster import SERVER_ARGV_ENV
from workers_ai_local.surfaces import openai, workers_ai
from workers_ai_local.text_generation import CAPACITY_EXCEEDED

log = logging.getLogger("workers_ai_local.ray_serve.proxy")
REPLICA_STOPPED = "Internal server error: the replica serving this request stopped"
# Ray's status (text/plain) -> ours
RAY_ERRORS = {
    429: ApiError(429, OUT_OF_CAPACITY, CAPACITY_EXCEEDED),  # the deployment's queue is full (--max-queue)
    503: ApiError(503, OUT_OF_CAPACITY, CAPACITY_EXCEEDED),  # no replica is running
    500: ApiError(500, INTERNAL, REPLICA_STOPPED),
    408: ApiError(504, INTERNAL, "The request timed out"),
}

REJECTED_BUSY = ApiError(429, OUT_OF_CAPACITY, CAPACITY_EXCEEDED)  # rejectIfBusy while every replica is full


def refusal(error: ApiError) -> ASGIApp:
    """An app that answers every request with `error`, in the shape of the request's route."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await openai.error_response(scope["path"], error)(scope, receive, send)

    return answer


def stream_error_event(scope: Scope, message: str) -> bytes:
    """The final event a stream of this route gets when its generation fails."""
    return openai.failure_event(message) if is_openai_path(scope["path"]) else workers_ai.failure_event(message)


class RayAnswers:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced: ApiError | None = None
        retry_after: bytes | None = None
        started = finished = streaming = False

        async def relay(message: Message) -> None:
            nonlocal replaced, retry_after, started, finished, streaming
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                from_ray = prefixes.REPLICA_HEADER not in headers  # every replica answer names its replica
                if from_ray and message["status"] in RAY_ERRORS:
                    replaced, retry_after = RAY_ERRORS[message["status"]], headers.get(b"retry-after")
                    return
                started = True
                streaming = headers.get(b"content-type", b"").startswith(sse.MEDIA_TYPE.encode())
            elif message["type"] == "http.response.body":
                if replaced is not None:
                    return  # Ray's text is dropped; ours goes out once the app returns
                finished = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, relay)
        except Exception as exc:  # Ray raises when the replica died before answering
            log.warning("%s %s failed in Ray: %r", scope["method"], scope["path"], exc)
        if replaced is None and not started:
            replaced = RAY_ERRORS[500]  # the replica died before answering: Ray sends nothing at all
        if replaced is not None and not started:
            response = openai.error_response(scope["path"], replaced)
            if retry_after:
                response.headers["retry-after"] = retry_after.decode()
            await response(scope, receive, send)
        elif streaming and not finished:
            # The replica went away mid-stream; a client that left first makes this a no-op.
            try:
                await send(
                    {
                        "type": "http.response.body",
                        "body": stream_error_event(scope, REPLICA_STOPPED),
                        "more_body": False,
                    }
                )
            except Exception:
                pass


def replica_reports() -> dict[str, dict[str, Any]]:
    """Replica id -> its last report, for the replicas this proxy's routers route to (exactly Serve's live set)."""
    reports: dict[str, dict[str, Any]] = {}
    for router in list(prefixes.ROUTERS):
        for replica_id, replica in router.curr_replicas.items():  # type: ignore[attr-defined]
            reports[replica_id.unique_id] = dict(replica.routing_stats or {})
    return reports


def merged_metrics(texts: dict[str, str]) -> bytes:
    """One Prometheus exposition of several replicas': each sample gains a `replica` label; HELP/TYPE once."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for replica_id, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            samples = [s._replace(labels={**s.labels, "replica": replica_id}) for s in family.samples]
            if family.name in families:
                families[family.name].samples.extend(samples)
            else:
                family.samples = samples
                families[family.name] = family

    class Replicas:
        def collect(self) -> Iterable[Any]:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Replicas())  # type: ignore[arg-type]
    return generate_latest(registry)


class ClusterEndpoints:
    def __init__(self, app: ASGIApp, tokens: list[str]) -> None:
        self.app = app
        self.metrics = TokenCheck(self._metrics, tokens)  # /metrics asks for the token the replicas would

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wanted = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
        if not wanted or scope["path"] not in ("/health", "/metrics") or not replica_reports():
            # Before the proxy's first request no router exists yet: a replica answers for itself.
            await self.app(scope, receive, send)
            return
        endpoint = self._health if scope["path"] == "/health" else self.metrics
        await endpoint(scope, receive, send)

    @staticmethod
    async def _health(scope: Scope, receive: Receive, send: Send) -> None:
        replicas = {rid: {k: v for k, v in report.items() if k not in ("metrics", "prefixes")}
                    for rid, report in replica_reports().items()}  # fmt: skip
        # A replica the router lists has passed its lifespan gate, so one not reported yet is ready too.
        ready = sum(1 for report in replicas.values() if report.get("status", "ready") == "ready")
        body = {"status": "ready" if ready else "unavailable", "replicas_ready": ready, "replicas": replicas}
        await JSONResponse(body, status_code=200 if ready else 503)(scope, receive, send)

    @staticmethod
    async def _metrics(scope: Scope, receive: Receive, send: Send) -> None:
        texts = {rid: report.get("metrics", "") for rid, report in replica_reports().items()}
        response = Response(merged_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")
        await response(scope, receive, send)


class PrefixKeys:
    def __init__(self, app: ASGIApp, max_body: int, tokens: list[str]) -> None:
        self.app = app
        self.max_body = max_body
        # A refusal here is answered only to a request the replica would have let in (its token checked the same
        # way); one forwarded by Miniflare carries its token in the path, and is left to the replica.
        self.reject_busy = TokenCheck(refusal(REJECTED_BUSY), tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        buffered: list[Message] = []
        size, complete = 0, False
        while size <= self.max_body and not complete:  # past the limit the replica answers 413 itself
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            complete = not message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in buffered)
        forwarded = any(name == b"mf-url" for name, _ in scope["headers"])
        if complete and not forwarded and busy.rejects_if_busy(body) and busy.cluster_busy():
            await self.reject_busy(scope, receive, send)
            return
        keys = prefixes.prefix_keys(body) if complete else []
        if keys:
            scope = {**scope, "headers": [*scope["headers"], (prefixes.PREFIX_HEADER, ",".join(keys).encode())]}

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


def middlewares() -> list[Middleware]:
    """Serve's proxy callback: the middleware around the proxy's app, outermost first."""
    settings = load_settings(json.loads(os.environ.get(SERVER_ARGV_ENV, "[]")))
    tokens = load_tokens(settings.api_token, settings.api_token_file)
    return [
        Middleware(RayAnswers),
        Middleware(ClusterEndpoints, tokens=tokens),
        Middleware(PrefixKeys, max_body=settings.max_body_bytes, tokens=tokens),
    ]
