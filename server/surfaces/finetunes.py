"""Workers AI's fine-tune routes: create a LoRA fine-tune, upload its PEFT assets, list fine-tunes."""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from ..adapters import AdapterError, AdapterStore
from ..config import SCHEMAS_DIR
from ..contract import SchemaCheck
from ..errors import TOO_LARGE, ApiError, bad_input, success
from ..http_io import read_json

PREFIX = "/client/v4/accounts/{account_id}/ai/finetunes"


def api_error(exc: AdapterError) -> ApiError:
    return ApiError(exc.status, exc.code, str(exc))


class FinetuneRoutes:
    def __init__(self, store: AdapterStore, max_body: int, max_asset: int) -> None:
        self.store = store
        self.max_body = max_body
        self.max_asset = max_asset
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

    def _too_large(self) -> ApiError:
        return ApiError(413, TOO_LARGE, f"Request is too large: an asset upload may be {self.max_asset} bytes at most")

    def _limited(self, request: Request) -> Request:
        """The request, its body counted as it arrives (declared or chunked) and refused past the asset limit."""
        received = 0

        async def receive() -> Message:
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > self.max_asset:
                raise self._too_large()
            return message

        return Request(request.scope, receive)

    async def upload(self, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_asset:
            raise self._too_large()
        # Starlette's parser spools the file to a temporary file (writing off the event loop once it is large);
        # the store copies it from there, checks and converts it, all in a worker thread.
        async with self._limited(request).form(max_files=1, max_fields=4) as form:
            file_name, upload = form.get("file_name"), form.get("file")
            if not isinstance(file_name, str) or not isinstance(upload, UploadFile):
                raise bad_input("Error: a multipart form with fields 'file_name' and 'file' is required")
            await upload.seek(0)
            try:
                finetune = await asyncio.to_thread(
                    self.store.upload, request.path_params["finetune"], file_name, upload.file
                )
            except AdapterError as exc:
                raise api_error(exc) from exc
        return success({**finetune.payload(), "file_name": file_name})
