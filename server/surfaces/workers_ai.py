"""Workers AI's REST API: `POST .../ai/run/{model}`, answering in the Cloudflare envelope or as Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .. import sse
from ..auth import cache_scope
from ..contract import RunRequest
from ..engine import GenerationFailed
from ..errors import INTERNAL, success
from ..http_io import CLIENT_CLOSED, SESSION_HEADER, read_json, unless_disconnected, while_connected
from ..run_options import DEFAULT_OPTIONS, RunOptions
from ..text_generation import Answer, TextGeneration


def failure_event(message: str) -> bytes:
    """The last event of a stream whose generation failed after it began."""
    return sse.event({"error": {"code": INTERNAL, "message": message}}, padded=False)


async def workers_ai_events(answer: Answer) -> AsyncIterator[bytes]:
    """Workers AI's stream: padded text events, one tool-call event, the usage event, then [DONE]; a failure after
    the stream began becomes a final error event. The Worker binding streams the same bytes."""
    try:
        async for text in answer.stream():
            yield sse.event({"response": text})
        if answer.calls:
            yield sse.event({"response": "", "tool_calls": [call.payload() for call in answer.calls]})
        yield sse.event({"response": "", "usage": answer.usage})
        yield sse.DONE
    except GenerationFailed as exc:
        yield failure_event(str(exc))
    finally:
        # Runs when the client goes away mid-stream too (the response task is cancelled).
        answer.close()


async def whole_result(request: Request, answer: Answer) -> dict[str, object] | None:
    """The finished result (`response`, `tool_calls`, `usage`), or None if the client left first."""
    text = await unless_disconnected(request, answer.generation, answer.text())
    if text is None:
        return None
    return {**answer.result(text), "usage": answer.usage}


class WorkersAIRoutes:
    def __init__(self, generation: TextGeneration, max_body: int) -> None:
        self.generation = generation
        self.max_body = max_body

    def routes(self) -> list[Route]:
        return [
            Route("/client/v4/accounts/{account_id}/ai/run/{model:path}", self.run, methods=["POST"]),
            Route("/ai/run/{model:path}", self.run, methods=["POST"]),
            Route("/ai/tokenize/{model:path}", self.tokenize, methods=["POST"]),
        ]

    async def run(self, request: Request) -> Response:
        body = await read_json(request, self.max_body)
        run = self.generation.parse(request.path_params["model"], body)
        assert isinstance(body, dict)  # the schema says so
        return await answer_run(self.generation, request, run, success, RunOptions.from_body(body))

    async def tokenize(self, request: Request) -> Response:
        """An extension for debugging prompts: the text and token ids a run body becomes, chat template, tools and
        special tokens applied, exactly as `/ai/run` would feed them to the model."""
        run = self.generation.parse(request.path_params["model"], await read_json(request, self.max_body))
        prompt = await while_connected(request, self.generation.prompt(run))
        if prompt is None:
            return Response(status_code=CLIENT_CLOSED)
        return success({"prompt": prompt[0], "tokens": prompt[1]})


async def answer_run(
    generation: TextGeneration,
    request: Request,
    run: RunRequest,
    whole: Callable[[dict[str, Any]], Response],
    options: RunOptions = DEFAULT_OPTIONS,
) -> Response:
    """Start `run` and answer it as Workers AI does: its events when streamed, else the result as `whole` wraps it
    (the REST API's envelope, the binding's bare result)."""
    session = request.headers.get(SESSION_HEADER)
    start = generation.start(run, session=session, options=options, cache_scope=cache_scope(request))
    answer = await while_connected(request, start)
    if answer is None:
        return Response(status_code=CLIENT_CLOSED)
    request.state.generation = answer.generation
    if run.stream:
        return StreamingResponse(workers_ai_events(answer), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
    result = await whole_result(request, answer)
    return Response(status_code=CLIENT_CLOSED) if result is None else whole(result)
