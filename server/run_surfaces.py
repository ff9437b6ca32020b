"""Which requests run the model, and through which surface: what the layers around the run path (faults, record
and replay) need to know about a request before any handler sees it, and how each surface answers an error."""

from __future__ import annotations

import enum
import uuid

from starlette.responses import Response

from .errors import ApiError
from .surfaces.binding import REQUEST_ID_HEADER, RUN_PATHS
from .surfaces.openai import from_api_error


class Surface(enum.Enum):
    WORKERS_AI = "workers-ai"  # POST .../ai/run/{model}: the envelope, or Workers AI's events
    BINDING = "binding"  # POST /run (a Worker's env.AI.run): the bare result, the same events
    OPENAI_CHAT = "chat"  # POST .../chat/completions
    OPENAI_COMPLETIONS = "completions"  # POST .../completions

    @property
    def openai(self) -> bool:
        return self in (Surface.OPENAI_CHAT, Surface.OPENAI_COMPLETIONS)

    def error(self, error: ApiError) -> Response:
        """The error as this surface's clients parse it (the binding's carries a request id, as every answer does)."""
        if self.openai:
            return from_api_error(error).response()
        response = error.response()
        if self is Surface.BINDING:
            response.headers[REQUEST_ID_HEADER] = str(uuid.uuid4())
        return response


def run_surface(method: str, path: str) -> Surface | None:
    """The surface a request runs the model through, or None for every other route (catalog, health, ...)."""
    if method != "POST":
        return None
    if path in RUN_PATHS:
        return Surface.BINDING
    if path.endswith("/chat/completions"):
        return Surface.OPENAI_CHAT
    if path.endswith("/completions"):
        return Surface.OPENAI_COMPLETIONS
    if "/ai/run/" in path or "/workers-ai/@" in path:
        return Surface.WORKERS_AI
    return None
