"""Workers AI's model catalog routes: search the served models, and read a model's input and output schemas."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import SCHEMAS_DIR
from ..errors import NO_SUCH_MODEL, ApiError, bad_input, success
from ..model_store import CatalogModel, ModelStore

PREFIX = "/client/v4/accounts/{account_id}/ai/models"
# What a Worker's env.AI.models() asks for (see surfaces/binding.py); it reads `result` of the same answer.
BINDING_MODELS_PATH = "/ai-api/models/search"
# Stable ids derived from model names, so a client may keep one across restarts.
_ID_NAMESPACE = uuid.UUID("5b0e8c55-2f1c-4b5e-9a57-1c5ea3d0a1f4")


class ModelCatalog:
    def __init__(self, store: ModelStore, context_window: Callable[[], int]) -> None:
        self.store = store
        self.context_window = context_window
        self.schemas = {
            name: {
                "input": json.loads((SCHEMAS_DIR / model.input_schema).read_text()),
                "output": json.loads((SCHEMAS_DIR / model.output_schema).read_text()),
            }
            for name, model in store.models.items()
        }

    def entry(self, model: CatalogModel) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid5(_ID_NAMESPACE, model.name)),
            "name": model.name,
            "description": model.description,
            "source": 1,
            "task": {
                "id": str(uuid.uuid5(_ID_NAMESPACE, model.task)),
                "name": model.task,
                "description": "Family of generative text models, such as large language models (LLM).",
            },
            "tags": [],
            "properties": [
                {"property_id": "context_window", "value": str(self.context_window())},
                {"property_id": "lora", "value": "true"},
                {"property_id": "function_calling", "value": "true"},
            ],
        }

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX + "/search", self.search, methods=["GET"]),
            Route(BINDING_MODELS_PATH, self.search, methods=["GET"]),
            Route(PREFIX + "/schema", self.schema, methods=["GET"]),
        ]

    async def search(self, request: Request) -> Response:
        query = request.query_params
        text = query.get("search", "").lower()
        task = query.get("task", "").lower()
        found = [
            self.entry(m)
            for m in self.store.models.values()
            if (not text or text in m.name.lower() or text in m.description.lower())
            and (not task or task == m.task.lower())
        ]
        try:
            page, per_page = int(query.get("page", "1")), int(query.get("per_page", "50"))
        except ValueError as exc:
            raise bad_input("Error: page and per_page must be integers") from exc
        if page < 1 or not 1 <= per_page <= 100:
            raise bad_input("Error: page must be >= 1 and per_page between 1 and 100")
        shown = found[(page - 1) * per_page : page * per_page]
        return JSONResponse(
            {
                "result": shown,
                "success": True,
                "errors": [],
                "messages": [],
                "result_info": {"count": len(shown), "page": page, "per_page": per_page, "total_count": len(found)},
            }
        )

    async def schema(self, request: Request) -> Response:
        name = request.query_params.get("model")
        if not name:
            raise bad_input("Error: the query parameter 'model' is required")
        schemas = self.schemas.get(name)
        if schemas is None:
            raise ApiError(400, NO_SUCH_MODEL, f"No such model {name}")
        return success(schemas)
