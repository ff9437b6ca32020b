"""Workers AI's error envelope and the error codes we answer with (see ../shared/spec/API.md), and OpenAI's
error object for the OpenAI-compatible routes."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

BAD_INPUT = 5006
NO_SUCH_MODEL = 5007
MISSING_BODY = 3003
TOO_LARGE = 3006
OUT_OF_CAPACITY = 3040
INVALID_MODEL_ID = 3042
INTERNAL = 3043
NO_ROUTE = 7003
METHOD_NOT_ALLOWED = 7001


class ApiError(Exception):
    """An answer in the error envelope; raise it anywhere in a handler."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def payload(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"result": None, "success": False, "errors": [self.payload()], "messages": []},
            status_code=self.status,
        )


def bad_input(detail: str) -> ApiError:
    return ApiError(400, BAD_INPUT, f"AiError: Bad input: {detail}")


def success(result: object) -> JSONResponse:
    return JSONResponse({"result": result, "success": True, "errors": [], "messages": []})


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "error": {"message": message, "type": kind, "param": extra.get("param"), "code": extra.get("code")}
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)
