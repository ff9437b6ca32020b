"""OpenAI-compatible routes, as Workers AI offers them under `/client/v4/accounts/{id}/ai/v1/` (and here under
`/v1/` too): chat completions, completions and models, streaming or not, with errors in OpenAI's shape.

Requests are validated against schemas/openai.*.schema.json (the same files /openapi.json is built from) and
become the same RunRequest the Workers AI route makes, so prompts, tools, JSON mode and sampling behave alike.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from jsonschema import Draft202012Validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import sse
from ..auth import cache_scope, is_openai_path
from ..config import SCHEMAS_DIR
from ..contract import RunRequest
from ..engine import GenerationFailed, SamplingParams
from ..errors import ApiError, OpenAIError
from ..http_io import CLIENT_CLOSED, SESSION_HEADER, read_json, unless_disconnected, while_connected
from ..run_options import RunOptions
from ..text_generation import Answer, TextGeneration

PREFIXES = ("/v1", "/client/v4/accounts/{account_id}/ai/v1")
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default, where Workers AI's own route uses 0.6


def from_api_error(exc: ApiError) -> OpenAIError:
    kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
    kind = kinds.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return OpenAIError(exc.status, exc.message, kind, code=str(exc.code))


def error_response(path: str, error: ApiError) -> Response:
    """An error in the shape the path's clients parse: OpenAI's object under the OpenAI prefixes, else the envelope."""
    return from_api_error(error).response() if is_openai_path(path) else error.response()


def failure_event(message: str) -> bytes:
    """The last event of a stream whose generation failed after it began."""
    return sse.event(OpenAIError(500, message, "server_error").body, padded=False)


def _load_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS_DIR / name).read_text()))


def _value(body: dict[str, Any], name: str, default: Any = None) -> Any:
    value = body.get(name)
    return default if value is None else value


def _integer(body: dict[str, Any], name: str) -> int | None:
    # JSON Schema counts 690.0 as an integer; the sampler needs an int.
    value = body.get(name)
    return None if value is None else int(value)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    return None if value is None else float(value)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _message(message: dict[str, Any]) -> dict[str, Any]:
    role = "system" if message["role"] == "developer" else message["role"]
    converted: dict[str, Any] = {"role": role, "content": _text(message.get("content"))}
    for key in ("name", "tool_call_id", "tool_calls"):
        if message.get(key):
            converted[key] = message[key]
    return converted


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
        }
        for call in calls
    ]


class OpenAIRoutes:
    def __init__(self, generation: TextGeneration, max_body: int) -> None:
        self.generation = generation
        self.max_body = max_body
        self.models = generation.models
        self.chat_schema = _load_validator("openai.chat-completions.request.schema.json")
        self.completion_schema = _load_validator("openai.completions.request.schema.json")

    def routes(self) -> list[Route]:
        routes = []
        for prefix in PREFIXES:
            routes += [
                Route(f"{prefix}/chat/completions", self.chat_completions, methods=["POST"]),
                Route(f"{prefix}/completions", self.completions, methods=["POST"]),
                Route(f"{prefix}/models", self.list_models, methods=["GET"]),
                Route(f"{prefix}/models/{{model:path}}", self.get_model, methods=["GET"]),
            ]
        return routes

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "workers-ai-local"}

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_entry(m) for m in self.models]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name not in self.models:
            return OpenAIError(404, f"The model '{name}' does not exist", code="model_not_found").response()
        return JSONResponse(self._model_entry(name))

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            return await self._generate(request, chat)
        except OpenAIError as exc:
            return exc.response()
        except ApiError as exc:
            return from_api_error(exc).response()

    def _parse(self, body: object, chat: bool) -> dict[str, Any]:
        validator = self.chat_schema if chat else self.completion_schema
        self.generation.refuse_long_conversation(body)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            where = ".".join(str(p) for p in errors[0].absolute_path) or None
            message = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or 'body'}: {e.message}" for e in errors[:5])
            raise OpenAIError(400, message, param=where)
        assert isinstance(body, dict)
        if body["model"] not in self.models:
            raise OpenAIError(404, f"The model '{body['model']}' does not exist", param="model", code="model_not_found")
        return body

    def _run_request(self, body: dict[str, Any], chat: bool) -> RunRequest:
        messages = [_message(m) for m in body["messages"]] if chat else None
        prompt = None
        if not chat:
            prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        fmt = _value(body, "response_format")
        if fmt is not None and fmt["type"] == "text":
            fmt = None
        if fmt is not None and fmt["type"] == "json_schema":
            fmt = {"type": "json_schema", "json_schema": fmt["json_schema"]["schema"]}
        return RunRequest(
            prompt=prompt,
            messages=messages,
            raw=not chat,  # the completions API continues the text as given, with no chat template
            stream=bool(_value(body, "stream", False)),
            max_tokens=int(_value(body, "max_completion_tokens", _value(body, "max_tokens", DEFAULT_MAX_TOKENS))),
            sampling=SamplingParams(
                temperature=float(_value(body, "temperature", DEFAULT_TEMPERATURE)),
                top_p=_number(body, "top_p"),
                top_k=_integer(body, "top_k"),
                seed=_integer(body, "seed"),
                repetition_penalty=_number(body, "repetition_penalty"),
                frequency_penalty=_number(body, "frequency_penalty"),
                presence_penalty=_number(body, "presence_penalty"),
            ),
            tools=[t["function"] for t in _value(body, "tools", [])] or None,
            lora=_value(body, "lora"),
            response_format=fmt,
        )

    @staticmethod
    def _tool_choice(body: dict[str, Any]) -> str:
        choice = _value(body, "tool_choice", "auto")
        return choice["function"]["name"] if isinstance(choice, dict) else choice

    async def _generate(self, request: Request, chat: bool) -> Response:
        body = self._parse(await read_json(request, self.max_body), chat)
        if self.generation.strict and body.get("lora") is not None:
            raise OpenAIError(400, "lora is an extension of workers-ai-local, off under --strict", param="lora")
        run = self._run_request(body, chat)
        if run.response_format is not None and run.stream:
            raise OpenAIError(400, "response_format with stream is not supported", param="response_format")
        if run.response_format is not None and run.tools:
            raise OpenAIError(400, "response_format and tools cannot be combined", param="response_format")
        choice = self._tool_choice(body)
        if choice not in ("auto", "none", "required") and choice not in {t["name"] for t in run.tools or []}:
            raise OpenAIError(400, f"tool_choice names {choice!r}, which is not among the tools", param="tool_choice")
        stop = _value(body, "stop", [])
        answer = await while_connected(
            request,
            self.generation.start(
                run,
                session=request.headers.get(SESSION_HEADER),
                tool_choice=choice,
                stops=[stop] if isinstance(stop, str) else stop,
                # Workers AI reads `options` at the top of the body; top-level `rejectIfBusy` is taken too, except
                # under --strict, where it is ignored as production ignores it.
                options=RunOptions.from_body(body, top_level=not self.generation.strict),
                cache_scope=cache_scope(request),
            ),
        )
        if answer is None:
            return Response(status_code=CLIENT_CLOSED)
        request.state.generation = answer.generation
        reply = Reply(body["model"], chat, answer)
        if run.stream:
            include_usage = bool((_value(body, "stream_options", {}) or {}).get("include_usage"))
            return StreamingResponse(reply.chunks(include_usage), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        text = await unless_disconnected(request, answer.generation, answer.text())
        if text is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply.whole(text))


class Reply:
    """One OpenAI response: the whole object, or its stream of chunks."""

    def __init__(self, model: str, chat: bool, answer: Answer) -> None:
        self.model = model
        self.chat = chat
        self.answer = answer
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def whole(self, text: str) -> dict[str, Any]:
        result = self.answer.result(text)  # raises ApiError when JSON mode was not met
        calls = result["tool_calls"]
        finish = self.answer.finish_reason
        if self.chat:
            content = text if self.answer.plan.json_schema is not None else result["response"]
            message: dict[str, Any] = {"role": "assistant", "content": content or None, "refusal": None}
            if calls:
                message["tool_calls"] = _tool_calls(calls)
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.answer.usage,
            "system_fingerprint": None,
        }

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None, text: str = "") -> bytes:
        if self.chat:
            choices = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
            kind = "chat.completion.chunk"
        else:
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            kind = "text_completion"
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return sse.event(chunk, padded=False)

    async def chunks(self, include_usage: bool) -> AsyncIterator[bytes]:
        answer = self.answer
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""})
            async for text in answer.stream():
                yield self._chunk({"content": text}, text=text)
            if answer.calls:
                calls = [call.payload() for call in answer.calls]
                yield self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(_tool_calls(calls))]})
            yield self._chunk({}, answer.finish_reason)
            if include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                usage = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
                yield sse.event({**usage, "choices": [], "usage": answer.usage}, padded=False)
            yield sse.DONE
        except GenerationFailed as exc:
            yield failure_event(str(exc))
        finally:
            answer.close()
