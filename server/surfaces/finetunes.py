"""Workers AI's fine-tune routes: create a LoRA fine-tune, upload its PEFT assets, list fine-tunes."""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..adapters import AdapterError, AdapterStore
from ..config import SCHEMAS_DIR
from ..contract import SchemaCheck
from ..errors import TOO_LARGE, ApiError, bad_input, success
from ..http_io import read_json

# Workers AI accepts adapter files under 500 MB.
MAX_ASSET_BYTES = 500 * 1024 * 1024
PREFIX = "/client/v4/accounts/{account_id}/ai/finetunes"


def api_error(exc: AdapterError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc))


class FinetuneRoutes:
    def __init__(self, store: AdapterStore, max_body: int) -> None:
        self.store = store
        self.max_body = max_body
        self.contract = SchemaCheck(SCHEMAS_DIR / "finetune.create.request.schema.json")

    def routes(self) -> list[Route]:
        return [
            Route(PREFIX, self.create, methods=["POST"]),
            Route(PREFIX, self.list, methods=["GET"]),
            Route(PREFIX + "/{finetune}/finetune-assets", self.upload, methods=["POST"]),
        ]

    async def create(self, request: Request) -> Response:
        body = self.contract.check(await read_json(request, self.max_body))
        try:
            finetune = self.store.create(body["model"], body["name"], str(body.get("description", "")))
        except AdapterError as exc:
            raise api_error(exc) from exc
        return success(finetune.payload())

    async def list(self, request: Request) -> Response:
        return success([f.payload() for f in self.store.finetunes()])

    async def upload(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_ASSET_BYTES:
            raise ApiError(413, TOO_LARGE, f"Request is too large: adapter files must be under {MAX_ASSET_BYTES} bytes")
        async with request.form(max_files=1, max_fields=4) as form:
            file_name, upload = form.get("file_name"), form.get("file")
            if not isinstance(file_name, str) or not isinstance(upload, UploadFile):
                raise bad_input("Error: a multipart form with fields 'file_name' and 'file' is required")
            data = await upload.read()
        try:
            finetune = self.store.upload(request.path_params["finetune"], file_name, data)
        except AdapterError as exc:
            raise api_error(exc) from exc
        return success({**finetune.payload(), "file_name": file_name})
