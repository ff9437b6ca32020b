"""Record and replay: answers from the real service, recorded once with credentials and replayed offline without.

A layer around the run path. With `--upstream URL --record DIR` each run request is forwarded to the Cloudflare API
(`https://api.cloudflare.com/client/v4/accounts/ID`, the token from CLOUDFLARE_API_TOKEN) and its answer is
passed on and written to DIR; with `--replay DIR` recorded answers are served with no network and no credentials,
and a request with no recording fails naming itself (`--on-miss fail`) or is answered by the local model
(`--on-miss local`).

What is recorded: the run routes. Workers AI's REST run and the binding's `/run` are one request (the same model
and inputs), recorded under one key as the REST API answers it; the binding serves that answer as the binding
does (the bare result, the same events, the envelope's error). The OpenAI routes are other requests (other
defaults, another answer shape): each has keys of its own. A key is the SHA-256 of the canonical JSON (sorted keys,
no spaces) of the kind, the model and the body; the account id, headers and the binding's options are not in it.

A recording is one small JSON file named `<kind>-<words of the prompt>-<key>.json`, no timestamps, rewritten
identically when the upstream answers identically: the request, the status, the content type and the body, a JSON
body as JSON and a stream as its list of events. Replay writes the very bytes recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import sse
from .config import Settings
from .errors import INTERNAL, ApiError
from .run_surfaces import Surface, run_surface
from .surfaces.binding import MODEL_HEADER, REQUEST_ID_HEADER

log = logging.getLogger("workers_ai_local.replay")

NO_RECORDING = 7404  # not a platform code: a miss is the test setup's to fix, never retried
UPSTREAM_ERROR = 502
# Answers not worth keeping: the platform's transient failures (capacity, timeouts, its own errors).
TRANSIENT = frozenset({408, 429})
KINDS = {
    Surface.WORKERS_AI: "run",
    Surface.BINDING: "run",
    Surface.OPENAI_CHAT: "chat",
    Surface.OPENAI_COMPLETIONS: "completions",
}
UPSTREAM_PATHS = {"run": "/ai/run/{model}", "chat": "/ai/v1/chat/completions", "completions": "/ai/v1/completions"}


def canonical(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def compact(value: object) -> bytes:
    """JSON as this server and the platform write it: no spaces, the key order kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class RequestKey:
    kind: str  # run, chat or completions
    model: str
    body: Any  # the run's inputs (the REST body, the binding's `inputs`) or the OpenAI body

    @property
    def digest(self) -> str:
        text = canonical({"kind": self.kind, "model": self.model, "body": self.body})
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        words = re.findall(r"[a-z0-9]+", self.prompt_text().lower())[:6]
        slug = "-".join(words)[:40].strip("-")
        return f"{self.kind}-{slug + '-' if slug else ''}{self.digest[:16]}.json"

    def prompt_text(self) -> str:
        body = self.body if isinstance(self.body, dict) else {}
        if isinstance(body.get("prompt"), str):
            return body["prompt"]
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
        content = messages[-1].get("content") if messages else ""
        return content if isinstance(content, str) else ""

    def describe(self) -> str:
        body = canonical(self.body)
        return f"{self.kind} {self.model} {body[:300]}{'...' if len(body) > 300 else ''}"


def request_key(surface: Surface, scope: Scope, body: bytes) -> RequestKey | None:
    """The key of a run request, or None where the request is malformed (the app then refuses it in its shape)."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    kind = KINDS[surface]
    if surface is Surface.BINDING:
        model = Headers(scope=scope).get(MODEL_HEADER)
        return RequestKey(kind, model, value["inputs"]) if model and "inputs" in value else None
    if surface.openai:
        model = value.get("model")
        return RequestKey(kind, model, value) if isinstance(model, str) else None
    path = scope["path"]
    marker = "/ai/run/" if "/ai/run/" in path else "/workers-ai/"
    return RequestKey(kind, path.split(marker, 1)[1], value)


@dataclass(frozen=True)
class Recording:
    status: int
    content_type: str
    body: bytes

    @property
    def is_stream(self) -> bool:
        return self.content_type.startswith(sse.MEDIA_TYPE)

    def to_json(self) -> dict[str, Any]:
        response: dict[str, Any] = {"status": self.status, "content_type": self.content_type}
        text = self.body.decode("utf-8", errors="surrogateescape")
        if self.is_stream and text.endswith("\n\n") and "\r" not in text:
            response["events"] = text[:-2].split("\n\n")
            return response
        try:
            value = json.loads(self.body)
        except ValueError:
            value = None
        if value is not None and compact(value) == self.body:
            response["json"] = value
        else:
            response["text"] = text
        return response

    @classmethod
    def from_json(cls, response: dict[str, Any]) -> Recording:
        if "events" in response:
            body = "".join(f"{event}\n\n" for event in response["events"]).encode()
        elif "json" in response:
            body = compact(response["json"])
        else:
            body = response["text"].encode("utf-8", errors="surrogateescape")
        return cls(int(response["status"]), str(response["content_type"]), body)

    def events(self) -> list[bytes]:
        return [frame + b"\n\n" for frame in self.body[:-2].split(b"\n\n")] if self.body.endswith(b"\n\n") else []


class RecordingStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self, key: RequestKey) -> Recording | None:
        path = self.folder / key.file_name
        if not path.is_file():
            return None
        return Recording.from_json(json.loads(path.read_text(encoding="utf-8"))["response"])

    def save(self, key: RequestKey, recording: Recording) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / key.file_name
        document = {
            # The body in canonical order: the same request, its keys sent in another order, writes the same file.
            "request": {"kind": key.kind, "model": key.model, "body": json.loads(canonical(key.body))},
            "response": recording.to_json(),
        }
        text = json.dumps(document, ensure_ascii=False, sort_keys=False, indent=2) + "\n"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)  # a reader never sees half a file
        return path


def serve(recording: Recording, surface: Surface) -> Response:
    """A recorded answer as the surface answers: byte for byte on the surface it was recorded from; on the
    binding, a REST answer as the binding's (its bare result, the same events, the envelope of an error)."""
    headers = {REQUEST_ID_HEADER: str(uuid.uuid4())} if surface is Surface.BINDING else {}
    if recording.is_stream:
        events = recording.events() or [recording.body]

        async def replayed() -> AsyncIterator[bytes]:
            for event in events:
                yield event

        response: Response = StreamingResponse(
            replayed(), status_code=recording.status, headers={**sse.HEADERS, **headers}
        )
    elif surface is Surface.BINDING and recording.status < 300:
        envelope = json.loads(recording.body)
        result = envelope.get("result") if isinstance(envelope, dict) else envelope
        return JSONResponse(result, headers=headers)
    else:
        response = Response(recording.body, status_code=recording.status, headers=headers)
    response.headers["content-type"] = recording.content_type  # as recorded, no charset added
    return response


class BufferedReceive:
    """Hands the app the body this layer already read, then the client's own messages (its disconnect)."""

    def __init__(self, body: bytes, more: bool, receive: Receive) -> None:
        self.messages: list[Message] = [{"type": "http.request", "body": body, "more_body": more}]
        self.receive = receive

    async def __call__(self) -> Message:
        return self.messages.pop(0) if self.messages else await self.receive()


async def read_at_most(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, and whether more is left unread because it passed `limit` (the app refuses it with 413)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False
        if size > limit:
            return b"".join(chunks), True


class RecordReplay:
    """The ASGI layer: replays (`upstream` None) or records (`upstream` set) every run request; others pass."""

    def __init__(
        self,
        app: ASGIApp,
        folder: Path,
        upstream: str | None,
        token: str | None,
        on_miss: str,
        max_body: int,
    ) -> None:
        self.app = app
        self.store = RecordingStore(folder)
        self.upstream = upstream.rstrip("/") if upstream else None
        self.token = token
        self.on_miss = on_miss
        self.max_body = max_body
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        surface = run_surface(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if surface is None:
            await self.app(scope, receive, send)
            return
        body, more = await read_at_most(receive, self.max_body)
        key = None if more else request_key(surface, scope, body)
        if key is None:
            await self.app(scope, BufferedReceive(body, more, receive), send)
            return
        if self.upstream is not None:
            response = await self.record(surface, key, body)
        else:
            recording = self.store.load(key)
            if recording is not None:
                response = serve(recording, surface)
            elif self.on_miss == "local":
                log.info("no recording %s: the local model answers", key.file_name)
                await self.app(scope, BufferedReceive(body, False, receive), send)
                return
            else:
                response = surface.error(self.miss(key))
        await response(scope, receive, send)

    def miss(self, key: RequestKey) -> ApiError:
        message = (
            f"No recording of this request in {self.store.folder} (it would be {key.file_name}): {key.describe()}. "
            "Record it with --upstream URL --record DIR, or let the local model answer with --on-miss local"
        )
        return ApiError(404, NO_RECORDING, message)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
            self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(600, connect=30))
        return self._client

    async def record(self, surface: Surface, key: RequestKey, body: bytes) -> Response:
        """Forward the request, pass the answer on (a stream event by event as it arrives) and write it down."""
        assert self.upstream is not None
        url = self.upstream + UPSTREAM_PATHS[key.kind].format(model=key.model)
        sent = compact(key.body) if surface is Surface.BINDING else body
        request = self.client.build_request("POST", url, content=sent, headers={"content-type": "application/json"})
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            message = f"The upstream {url} did not answer: {exc!r}"
            return surface.error(ApiError(UPSTREAM_ERROR, INTERNAL, message))
        content_type = upstream.headers.get("content-type", "application/json")
        if not content_type.startswith(sse.MEDIA_TYPE):
            try:
                whole = await upstream.aread()
            finally:
                await upstream.aclose()
            recording = Recording(upstream.status_code, content_type, whole)
            self.keep(key, recording)
            return serve(recording, surface)

        async def relayed() -> AsyncIterator[bytes]:
            chunks: list[bytes] = []
            try:
                async for chunk in upstream.aiter_bytes():
                    chunks.append(chunk)
                    yield chunk
            finally:
                await upstream.aclose()
            self.keep(key, Recording(upstream.status_code, content_type, b"".join(chunks)))

        headers = {**sse.HEADERS}
        if surface is Surface.BINDING:
            headers[REQUEST_ID_HEADER] = str(uuid.uuid4())
        response = StreamingResponse(relayed(), upstream.status_code, headers=headers)
        response.headers["content-type"] = content_type
        return response

    def keep(self, key: RequestKey, recording: Recording) -> None:
        if recording.status in TRANSIENT or recording.status >= 500:
            log.warning("not recorded: %s answered %d", key.file_name, recording.status)
            return
        path = self.store.save(key, recording)
        log.info("recorded %s", path)


def layer(settings: Settings, token: str | None) -> list[Middleware]:
    """The record or replay layer the settings ask for, if any; exits naming the conflict on bad flags."""
    if settings.upstream and settings.replay:
        raise SystemExit("--upstream records and --replay replays: give one of them")
    if settings.upstream and not settings.record:
        raise SystemExit("--upstream needs --record DIR, the folder the recordings are written to")
    if settings.record and not settings.upstream:
        raise SystemExit("--record DIR needs --upstream URL, the service whose answers are recorded")
    if settings.on_miss not in ("fail", "local"):
        raise SystemExit(f"--on-miss {settings.on_miss!r}: fail or local")
    if settings.upstream:
        folder, upstream = settings.record, settings.upstream
    elif settings.replay:
        folder, upstream = settings.replay, None
        if not Path(folder).is_dir():
            raise SystemExit(f"--replay {folder}: no such folder of recordings")
    else:
        return []
    options = {"folder": Path(folder), "upstream": upstream, "token": token, "on_miss": settings.on_miss}
    return [Middleware(RecordReplay, **options, max_body=settings.max_body_bytes)]
