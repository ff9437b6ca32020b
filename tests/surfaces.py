"""Every API surface as a test sees it: one request in Workers AI's input shape goes in, each surface sends it in its
own HTTP form and reads back a `Reply` (text, usage, finish reason, tool calls) or an error in its own shape.

The behavioural matrix (test_matrix.py) is written once against this interface and parametrised over `SURFACES`;
a new surface joins by adding a driver here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from conftest import MODEL

ACCOUNT = "0123456789abcdef"


@dataclass
class Reply:
    text: str
    usage: dict[str, Any]
    finish_reason: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def sse_payloads(raw: str) -> list[str]:
    """The `data:` payloads of a stream, checking the framing: `data: <one line>` events, each ending in a blank
    line, the last one `[DONE]`."""
    assert raw.endswith("\n\n"), f"the stream does not end with a complete event: {raw[-200:]!r}"
    frames = raw.split("\n\n")[:-1]
    assert frames, "an empty stream"
    for frame in frames:
        assert frame.startswith("data: ") and "\n" not in frame, f"not an SSE data event: {frame!r}"
    payloads = [frame.removeprefix("data: ") for frame in frames]
    assert payloads[-1] == "[DONE]", f"the stream does not end with data: [DONE]: {payloads[-3:]}"
    assert "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def workers_ai_finish(result: dict[str, Any], max_tokens: int) -> str:
    """Workers AI reports no finish reason; what ended the answer shows in the result itself."""
    if result.get("tool_calls"):
        return "tool_calls"
    return "length" if result["usage"]["completion_tokens"] >= max_tokens else "stop"


class Surface:
    """A driver for one API surface. `body` is always in Workers AI's input shape."""

    name: str
    default_temperature: float
    default_max_tokens = 256
    has_stop_sequences = False

    def __repr__(self) -> str:
        return self.name

    # -- requests ---------------------------------------------------------------------------------------------

    def request(self, body: dict[str, Any], token: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(path, headers, JSON body) of this surface's request."""
        raise NotImplementedError

    def post(self, http: httpx.Client, body: dict[str, Any], token: str | None = None, **extra: Any) -> httpx.Response:
        path, headers, payload = self.request(body, token)
        return http.post(path, json=payload, headers={**headers, **extra.pop("headers", {})}, **extra)

    def with_options(self, payload: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """A request body of this surface carrying run options (e.g. rejectIfBusy) where Workers AI reads them:
        an `options` object beside the inputs (the binding's third argument travels in it)."""
        return {**payload, "options": {**payload.get("options", {}), **options}}

    @contextmanager
    def open_stream(
        self, http: httpx.Client, body: dict[str, Any], token: str | None = None
    ) -> Iterator[httpx.Response]:
        path, headers, payload = self.request({**body, "stream": True}, token)
        with http.stream("POST", path, json=payload, headers=headers) as response:
            yield response

    # -- answers ----------------------------------------------------------------------------------------------

    def complete(self, http: httpx.Client, body: dict[str, Any], token: str | None = None) -> Reply:
        response = self.post(http, {**body, "stream": False}, token)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json", response.headers
        return self.reply(response.json(), body)

    def stream(self, http: httpx.Client, body: dict[str, Any], token: str | None = None) -> Reply:
        with self.open_stream(http, body, token) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = response.read().decode("utf-8")
        return self.stream_reply([json.loads(p) for p in sse_payloads(raw)], body)

    def reply(self, payload: dict[str, Any], body: dict[str, Any]) -> Reply:
        raise NotImplementedError

    def stream_reply(self, events: list[dict[str, Any]], body: dict[str, Any]) -> Reply:
        raise NotImplementedError

    def error(self, response: httpx.Response, status: int) -> str:
        """Check that `response` is an error of `status` in this surface's own shape; return its message."""
        raise NotImplementedError


def _max_tokens(body: dict[str, Any], default: int) -> int:
    return body.get("max_tokens", default)


class WorkersAIErrors:
    """Errors in the Cloudflare envelope, which the REST API and the binding share."""

    def error(self, response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["success"] is False and body["result"] is None and body["messages"] == [], body
        assert isinstance(body["errors"][0]["code"], int)
        return body["errors"][0]["message"]

    def stream_reply(self, events: list[dict[str, Any]], body: dict[str, Any]) -> Reply:
        *pieces, final = events
        for event in pieces:
            assert set(event) <= {"response", "p", "tool_calls"}, event
        assert final["response"] == "" and "usage" in final, final
        calls = [call for event in pieces for call in event.get("tool_calls", [])]
        result = {"usage": final["usage"], "tool_calls": calls}
        text = "".join(event["response"] for event in pieces)
        return Reply(text, final["usage"], workers_ai_finish(result, _max_tokens(body, 256)), calls)


class WorkersAIRest(WorkersAIErrors, Surface):
    default_temperature = 0.6

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path

    def request(self, body: dict[str, Any], token: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return self.path, headers, body

    def reply(self, payload: dict[str, Any], body: dict[str, Any]) -> Reply:
        assert payload["success"] is True and payload["errors"] == [], payload
        result = payload["result"]
        finish = workers_ai_finish(result, _max_tokens(body, self.default_max_tokens))
        return Reply(result["response"], result["usage"], finish, result["tool_calls"])


class WorkerBinding(WorkersAIErrors, Surface):
    """The request workerd's Ai binding makes, sent straight (`/run`) or as Miniflare's proxy forwards it (`/`)."""

    default_temperature = 0.6

    def __init__(self, name: str, proxied: bool) -> None:
        self.name = name
        self.proxied = proxied

    def request(self, body: dict[str, Any], token: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
        original = {"content-type": "application/json", "cf-consn-model-id": MODEL, "cf-consn-sdk-version": "3"}
        payload = {"inputs": body, "options": {}}
        if not self.proxied:
            headers = {**original, **({"authorization": f"Bearer {token}"} if token else {})}
            return "/run?version=3", headers, payload
        headers = {f"MF-Header-{name}": value for name, value in original.items()}
        headers |= {"MF-Binding": "AI", "MF-URL": "https://workers-binding.ai/run?version=3"}
        # Miniflare forwards no credentials; a token rides in the connection string's path.
        return (f"/binding/{token}" if token else "/"), headers, payload

    def reply(self, payload: dict[str, Any], body: dict[str, Any]) -> Reply:
        assert set(payload) == {"response", "tool_calls", "usage"}, payload  # the bare result, no envelope
        finish = workers_ai_finish(payload, _max_tokens(body, self.default_max_tokens))
        return Reply(payload["response"], payload["usage"], finish, payload["tool_calls"])


class OpenAI(Surface):
    """Chat completions, or text completions for a raw prompt (the completions API applies no template)."""

    default_temperature = 1.0
    has_stop_sequences = True

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix

    def request(self, body: dict[str, Any], token: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        payload = {k: v for k, v in body.items() if k not in ("prompt", "messages", "raw", "tools")}
        payload["model"] = MODEL
        if body.get("stream"):
            payload["stream_options"] = {"include_usage": True}
        if body.get("tools"):
            payload["tools"] = [t if "function" in t else {"type": "function", "function": t} for t in body["tools"]]
        if body.get("raw"):
            return f"{self.prefix}/completions", headers, {**payload, "prompt": body["prompt"]}
        messages = body.get("messages") or [{"role": "user", "content": body["prompt"]}]
        return f"{self.prefix}/chat/completions", headers, {**payload, "messages": messages}

    def reply(self, payload: dict[str, Any], body: dict[str, Any]) -> Reply:
        choice = payload["choices"][0]
        calls = []
        if "message" in choice:
            assert payload["object"] == "chat.completion"
            text = choice["message"]["content"] or ""
            for call in choice["message"].get("tool_calls") or []:
                calls.append({"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])})
        else:
            assert payload["object"] == "text_completion"
            text = choice["text"]
        return Reply(text, payload["usage"], choice["finish_reason"], calls)

    def stream_reply(self, events: list[dict[str, Any]], body: dict[str, Any]) -> Reply:
        *chunks, usage = events
        assert usage["choices"] == [] and "usage" in usage, usage
        text, finish, calls = "", None, []
        for chunk in chunks:
            (choice,) = chunk["choices"]
            assert finish is None, "a chunk after the one with the finish reason"
            finish = choice["finish_reason"]
            if "delta" in choice:
                text += choice["delta"].get("content") or ""
                for call in choice["delta"].get("tool_calls") or []:
                    arguments = json.loads(call["function"]["arguments"])
                    calls.append({"name": call["function"]["name"], "arguments": arguments})
            else:
                text += choice["text"]
        assert finish is not None, "no chunk carried a finish reason"
        return Reply(text, usage["usage"], finish, calls)

    def error(self, response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return error["message"]


SURFACES: list[Surface] = [
    WorkersAIRest("rest-account", f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"),
    WorkersAIRest("rest-short", f"/ai/run/{MODEL.replace('/', '%2F')}"),
    OpenAI("openai-account", f"/client/v4/accounts/{ACCOUNT}/ai/v1"),
    OpenAI("openai-v1", "/v1"),
    WorkerBinding("binding-direct", proxied=False),
    WorkerBinding("binding-miniflare", proxied=True),
]
