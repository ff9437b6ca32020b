"""The ASGI application: routes, error envelope and the engine's lifetime, wired explicitly."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from . import openapi
from .access_log import AccessLog
from .adapters import AdapterStore, BaseShape
from .auth import TokenCheck, load_tokens
from .catalog_routes import ModelCatalog
from .config import SCHEMAS_DIR, Settings
from .contract import InputContract
from .engine import Engine
from .errors import INTERNAL, METHOD_NOT_ALLOWED, NO_ROUTE, ApiError
from .finetune_routes import FinetuneRoutes
from .metrics import ServerMetrics
from .model_store import ModelStore
from .openai_routes import OpenAIRoutes
from .routes import TextGenerationRoutes

log = logging.getLogger("server.app")


async def api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return ApiError(405, METHOD_NOT_ALLOWED, f"Method {request.method} not allowed here").response()
    if exc.status_code == 404:
        return ApiError(404, NO_ROUTE, f"Could not route to {request.url.path}").response()
    return ApiError(exc.status_code, exc.status_code, str(exc.detail)).response()


async def unexpected_error(request: Request, exc: Exception) -> Response:
    # A bug of ours: log the traceback here, give the client the envelope, never the traceback.
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, INTERNAL, "Internal server error").response()


def base_shape(engine: Engine) -> BaseShape | None:
    arch = engine.model_metadata("general.architecture")
    heads = engine.model_metadata(f"{arch}.attention.head_count")
    if arch is None or heads is None:
        return None
    kv_heads = engine.model_metadata(f"{arch}.attention.head_count_kv") or heads
    return BaseShape(int(heads), int(kv_heads))


def create_app(settings: Settings, engine: Engine, store: ModelStore) -> Starlette:
    contracts = {name: InputContract(SCHEMAS_DIR / model.input_schema) for name, model in store.models.items()}
    adapters = AdapterStore(Path(settings.lora_dir), set(store.models), lambda: base_shape(engine))
    text_generation = TextGenerationRoutes(engine, contracts, adapters, settings.max_body_bytes)
    finetunes = FinetuneRoutes(adapters, settings.max_body_bytes)
    openai = OpenAIRoutes(text_generation, engine, adapters)
    catalog = ModelCatalog(store, lambda: engine.context_per_slot)
    metrics = ServerMetrics(engine)

    async def metrics_endpoint(_request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    document = openapi.build(store)
    playground = (Path(__file__).parent / "playground.html").read_text()

    async def openapi_endpoint(_request: Request) -> Response:
        return JSONResponse(document)

    async def playground_endpoint(_request: Request) -> Response:
        return HTMLResponse(playground)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    return Starlette(
        routes=[
            *text_generation.routes(),
            *finetunes.routes(),
            *openai.routes(),
            *catalog.routes(),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
            Route("/", playground_endpoint, methods=["GET"]),
        ],
        middleware=[
            Middleware(AccessLog, metrics=metrics),
            Middleware(TokenCheck, tokens=load_tokens(settings.api_token, settings.api_token_file)),
        ],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: unexpected_error},
        lifespan=lifespan,
    )
