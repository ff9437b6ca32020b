"""The ASGI application: routes, error envelope and the engine's lifetime, wired explicitly."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route

from . import faults, openapi, replay
from .access_log import AccessLog, loggable_path
from .adapters import AdapterStore, BaseShape
from .auth import TokenCheck, load_tokens
from .browser_guard import BrowserGuard, split_list
from .config import SCHEMAS_DIR, UPSTREAM_TOKEN_ENV, Settings
from .contract import InputContract
from .engine import ContextSettings, Engine
from .errors import INTERNAL, METHOD_NOT_ALLOWED, NO_ROUTE, ApiError
from .gateway import GatewayLayer, GatewayLogRoutes, GatewayStore, served_model
from .http_io import CLIENT_CLOSED
from .metrics import ServerMetrics
from .model_store import ModelStore
from .strict import StrictRoutes
from .surfaces.binding import BindingRoutes, MiniflareProxy
from .surfaces.catalog import ModelCatalog
from .surfaces.finetunes import FinetuneRoutes
from .surfaces.openai import OpenAIRoutes, error_response
from .surfaces.operations import OperationsRoutes
from .surfaces.workers_ai import WorkersAIRoutes
from .text_generation import TextGeneration

log = logging.getLogger("workers_ai_local.app")


async def api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


def allowed_methods(request: Request) -> str:
    """Every method some route of this path takes (Starlette's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error = ApiError(405, METHOD_NOT_ALLOWED, f"Method {request.method} not allowed here")
    elif exc.status_code == 404:
        error = ApiError(404, NO_ROUTE, f"Could not route to {request.url.path}")
    else:
        error = ApiError(exc.status_code, exc.status_code, str(exc.detail))
    # An OpenAI client reads errors under the OpenAI prefixes in OpenAI's shape, routed or not.
    response = error_response(request.url.path, error)
    if exc.status_code == 405:
        response.headers["allow"] = allowed_methods(request)
    return response


async def unexpected_error(request: Request, exc: Exception) -> Response:
    # A bug of ours: log the traceback here, give the client the envelope, never the traceback.
    log.exception("unhandled error on %s %s", request.method, loggable_path(request.url.path), exc_info=exc)
    return error_response(request.url.path, ApiError(500, INTERNAL, "Internal server error"))


async def client_gone(_request: Request, _exc: Exception) -> Response:
    # The client left while its body was being read: nobody reads this answer; the access log records the 499.
    return Response(status_code=CLIENT_CLOSED)


def base_shape(engine: Engine) -> BaseShape | None:
    arch = engine.model_metadata("general.architecture")
    heads = engine.model_metadata(f"{arch}.attention.head_count")
    if arch is None or heads is None:
        return None
    kv_heads = engine.model_metadata(f"{arch}.attention.head_count_kv") or heads

    def size(key: str) -> int:
        value = engine.model_metadata(f"{arch}.{key}")
        return int(value) if value is not None else 0

    return BaseShape(
        int(heads),
        int(kv_heads),
        n_layer=size("block_count"),
        n_embd=size("embedding_length"),
        n_ff=size("feed_forward_length"),
        head_dim=size("attention.key_length"),
    )


def create_engine(
    settings: Settings, fetch: Callable[[], Path], on_failure: Callable[[str], None] | None = None
) -> Engine:
    """The engine the settings describe; it fetches and loads its model once started (by the app's lifespan)."""
    return Engine(
        fetch,
        ContextSettings(
            n_ctx=settings.ctx_size,
            kv_size=settings.kv_size,
            cache_type=settings.cache_type,
            kv_layout=settings.kv_layout,
            flash_attention=settings.flash_attention,
            n_batch=settings.batch_size,
            n_seq=settings.parallel,
            n_threads=settings.effective_threads,
            n_gpu_layers=settings.gpu_layers,
        ),
        max_queue=settings.max_queue,
        max_messages=settings.max_messages,
        max_prompt_chars=settings.max_prompt_chars,
        on_failure=on_failure,
        chat_date=settings.chat_date,
        max_stall_ms=settings.max_stall_ms,
        prefill_block=settings.prefill_block,
    )


def browser_guard(settings: Settings) -> list[Middleware]:
    origins = [origin.rstrip("/") for origin in split_list(settings.cors_origins)]
    allowed_hosts = split_list(settings.allowed_hosts)
    guard = Middleware(
        BrowserGuard,
        check_host=settings.loopback or bool(allowed_hosts),
        allowed_hosts=allowed_hosts,
        cors_origins=origins,
    )
    if not origins:
        return [guard]
    # Pages of the allowed origins get CORS headers, and their preflight requests an answer.
    cors = Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"], max_age=600)
    return [guard, cors]


def create_app(settings: Settings, engine: Engine, store: ModelStore) -> Starlette:
    contracts = {name: InputContract(SCHEMAS_DIR / model.input_schema) for name, model in store.models.items()}
    adapters = AdapterStore(Path(settings.lora_dir), set(store.models), lambda: base_shape(engine))
    generation = TextGeneration(engine, contracts, adapters, strict=settings.strict)
    metrics = ServerMetrics(engine)
    gateway = GatewayStore(settings.gateway_dir, settings.gateway_max_logs, settings.gateway_max_cache_bytes)
    surfaces = [
        WorkersAIRoutes(generation, settings.max_body_bytes),
        BindingRoutes(generation, settings.max_body_bytes),
        OpenAIRoutes(generation, settings.max_body_bytes),
        ModelCatalog(store, lambda: engine.context_window),
        FinetuneRoutes(adapters, settings.max_body_bytes, settings.max_asset_bytes),
        OperationsRoutes(engine, metrics, openapi.build(store)),
        GatewayLogRoutes(gateway),
    ]

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            gateway.close()

    app = Starlette(
        routes=[route for surface in surfaces for route in surface.routes()],
        # Outermost first: a Miniflare-forwarded request is unwrapped before it is logged, counted or authorized;
        # a request from a foreign browser page is refused (and logged) before anything else.
        middleware=[
            Middleware(MiniflareProxy),
            Middleware(AccessLog, metrics=metrics),
            *browser_guard(settings),
            Middleware(TokenCheck, tokens=load_tokens(settings.api_token, settings.api_token_file)),
            # --strict: the extension routes answer as routes that do not exist (before the gateway rewrites paths).
            *([Middleware(StrictRoutes)] if settings.strict else []),
            # A gateway request is authorized first, then answered from the cache or by the surfaces.
            Middleware(
                GatewayLayer,
                store=gateway,
                served_model=served_model(settings, store),
                default_ttl=settings.gateway_cache_ttl,
                max_body=settings.max_body_bytes,
            ),
            # Inside the gateway (a cached answer meets no fault and no upstream); faults before replay: a recorded
            # answer can still meet a fault.
            *faults.layer(settings),
            *replay.layer(settings, os.environ.get(UPSTREAM_TOKEN_ENV)),
        ],
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            ClientDisconnect: client_gone,
            Exception: unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.metrics = metrics  # read by a Ray Serve replica, which reports it for the whole cluster's /metrics
    return app
