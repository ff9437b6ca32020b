"""HTTP endpoints of the Workers AI REST API: run a model, and report health.

Handlers turn HTTP into engine requests and engine output into Workers AI's JSON and SSE shapes; they never
touch llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import sse
from .adapters import AdapterError, AdapterStore
from .contract import InputContract
from .engine import (
    ChatTemplateError,
    CompletionRequest,
    Engine,
    EngineNotReady,
    EngineState,
    Generation,
    GenerationFailed,
    GrammarError,
    PromptTooLong,
    QueueFull,
    Usage,
)
from .errors import (
    INTERNAL,
    INVALID_MODEL_ID,
    MISSING_BODY,
    NO_SUCH_MODEL,
    OUT_OF_CAPACITY,
    TOO_LARGE,
    ApiError,
    bad_input,
    success,
)
from .run_plan import RunPlan
from .tools import CallStream, ToolCalling

T = TypeVar("T")

# Not a status a server normally sends (nginx's "client closed request"); it only ever reaches the log.
CLIENT_CLOSED = 499


CAPACITY_EXCEEDED = "Capacity temporarily exceeded, please try again."
# Workers AI's header for keeping a conversation on the instance that holds its prompt cache.
SESSION_HEADER = "x-session-affinity"


def usage_payload(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, TOO_LARGE, f"Request is too large: {declared} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, TOO_LARGE, f"Request is too large: over {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ApiError(400, MISSING_BODY, "Request is missing headers or body: expected a JSON object")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_input(f"Error: the request body is not valid JSON ({exc})") from exc
    # JSON may spell a lone UTF-16 surrogate (\ud800), which no UTF-8 text (nor tokenizer) can hold.
    if b"\\u" in body:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_input("Error: the request body holds a lone surrogate escape, which is not text") from exc
    return value


async def wait_for_disconnect(request: Request) -> None:
    # The body is fully read by now, so the next message the server hands us is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, generation: Generation, work: Awaitable[T]) -> T | None:
    """The result of `work` (which consumes `generation`), or None, with the generation cancelled, if the client
    goes away first. Raises ApiError (500) if the generation fails."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not task.done():
            generation.cancel()
            task.cancel()
    if not task.done() or task.cancelled():
        return None
    try:
        return task.result()
    except GenerationFailed as exc:
        raise ApiError(500, INTERNAL, str(exc)) from exc


class TextGenerationRoutes:
    def __init__(
        self, engine: Engine, contracts: dict[str, InputContract], adapters: AdapterStore, max_body: int
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.contracts = contracts
        self.max_body = max_body

    def routes(self) -> list[Route]:
        return [
            Route("/client/v4/accounts/{account_id}/ai/run/{model:path}", self.run, methods=["POST"]),
            Route("/ai/run/{model:path}", self.run, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    async def health(self, request: Request) -> Response:
        state = self.engine.state
        body: dict[str, object] = {
            "status": state.value,
            "slots": self.engine.slots,
            "slots_busy": self.engine.busy_slots,
            "queue_depth": self.engine.queue_depth,
            "context_per_slot": self.engine.context_per_slot,
            "prefill_block": self.engine.prefill_block,
        }
        if self.engine.error:
            body["error"] = self.engine.error
        return JSONResponse(body, status_code=200 if state is EngineState.READY else 503)

    async def run(self, request: Request) -> Response:
        model = request.path_params["model"]
        contract = self.contracts.get(model)
        if contract is None:
            raise ApiError(400, NO_SUCH_MODEL, f"No such model {model} or task")
        run = contract.parse(await read_json(request, self.max_body))
        adapter = self.adapter_path(run.lora) if run.lora is not None else None
        plan = RunPlan.build(run, native_tools=self.engine.native_tools)
        generation = await self.submit(plan.completion(run, request.headers.get(SESSION_HEADER), adapter))
        request.state.generation = generation
        if run.stream:
            events = self._events(generation, plan.tools)
            return StreamingResponse(events, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        return await self._complete(request, generation, plan)

    def adapter_path(self, name: str) -> Path:
        try:
            path = self.adapters.resolve(name)
        except AdapterError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from exc
        if path is None:
            raise ApiError(404, INVALID_MODEL_ID, f"Invalid model id: no LoRA adapter or fine-tune named {name!r}")
        return path

    async def submit(self, completion: CompletionRequest) -> Generation:
        """Queue a generation, turning the engine's refusals into Workers AI's errors."""
        try:
            return await self.engine.submit(completion)
        except GrammarError as exc:
            raise bad_input(f"Error: {exc}") from exc
        except PromptTooLong as exc:
            raise bad_input(f"Error: {exc}; shorten the input") from exc
        except ChatTemplateError as exc:
            raise bad_input(f"Error: {exc}") from exc
        except QueueFull as exc:
            raise ApiError(429, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc
        except EngineNotReady as exc:
            raise ApiError(503, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc

    async def _complete(self, request: Request, generation: Generation, plan: RunPlan) -> Response:
        text = await unless_disconnected(request, generation, generation.text())
        if text is None:
            return Response(status_code=CLIENT_CLOSED)
        return success({**plan.result(text), "usage": usage_payload(generation.usage)})

    @staticmethod
    async def _events(generation: Generation, tools: ToolCalling | None) -> AsyncIterator[bytes]:
        answer = CallStream(tools)
        try:
            async for piece in generation:
                text = answer.feed(piece)
                if text:
                    yield sse.event({"response": text})
            text, calls = answer.finish()
            if text:
                yield sse.event({"response": text})
            if calls:
                yield sse.event({"response": "", "tool_calls": [call.payload() for call in calls]})
            yield sse.event({"response": "", "usage": usage_payload(generation.usage)})
            yield sse.DONE
        except GenerationFailed as exc:
            yield sse.event({"error": {"code": INTERNAL, "message": str(exc)}}, padded=False)
        finally:
            # Runs when the client goes away mid-stream too (the response task is cancelled).
            generation.cancel()
