"""The server's own routes, beside the AI APIs: health, Prometheus metrics, the OpenAPI document, the playground."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..engine import Engine, EngineState
from ..metrics import ServerMetrics

PLAYGROUND = Path(__file__).resolve().parent.parent / "playground.html"


def health_report(engine: Engine) -> dict[str, object]:
    """What /health says of one engine (a Ray Serve cluster's /health gives one of these per replica)."""
    body: dict[str, object] = {
        "status": engine.state.value,
        "slots": engine.slots,
        "slots_busy": engine.busy_slots,
        "queue_depth": engine.queue_depth,
        "context_window": engine.context_window,
        "kv_layout": engine.kv_layout,
        "kv_size": engine.kv_size,
        "kv_reserved": engine.kv_reserved,
        "prefill_block": engine.prefill_block,
        "flash_attention": engine.flash_attention,
    }
    if engine.error:
        body["error"] = engine.error
    return body


class OperationsRoutes:
    def __init__(self, engine: Engine, metrics: ServerMetrics, openapi_document: dict[str, Any]) -> None:
        self.engine = engine
        self.metrics = metrics
        self.openapi_document = openapi_document
        self.playground_page = PLAYGROUND.read_text()

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/", self.playground, methods=["GET"]),
        ]

    async def health(self, _request: Request) -> Response:
        ready = self.engine.state is EngineState.READY
        return JSONResponse(health_report(self.engine), status_code=200 if ready else 503)

    async def metrics_text(self, _request: Request) -> Response:
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(self.openapi_document)

    async def playground(self, _request: Request) -> Response:
        return HTMLResponse(self.playground_page)
