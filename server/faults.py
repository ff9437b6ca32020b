"""Faults on demand: the platform's failures, in its exact shapes, so that a user's tests can exercise their retry
and error paths. A layer around the run path: a request names its fault in a header (`x-workers-ai-local-fault`,
which a Worker sets through the binding's `extraHeaders`), or the server draws one for each run request at the
rates `--fault` gives, from a generator seeded by `--fault-seed` (the same requests in the same order meet the same
faults on every run).

An error fault answers at once, before the request's body is read or any model work is done, in the surface's own
shape (the envelope on Workers AI's REST API and the binding, whose Worker then raises `InferenceUpstreamError:
<code>: <message>`; OpenAI's error object on the OpenAI routes). A `stream-N` fault lets a streamed answer run and
cuts it after N pieces of text with the surface's final error event, as a generation that fails mid-stream ends.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import INTERNAL, ApiError, bad_input
from .run_surfaces import Surface, run_surface
from .surfaces import openai, workers_ai
from .text_generation import CAPACITY_EXCEEDED

log = logging.getLogger("workers_ai_local.faults")

FAULT_HEADER = "x-workers-ai-local-fault"
NO_FAULT = "none"  # the header's way to opt one request out of the server's drawn faults
STREAM_PREFIX = "stream-"
# The platform's own words (developers.cloudflare.com/workers-ai/platform/errors; 4006 and 3040 as users see them
# from the REST API and the binding). 4006 carries a request id in parentheses, as it does in the wild.
DAILY_LIMIT = (
    "You have used up your daily free allocation of 10,000 neurons. Please upgrade to Cloudflare's Workers Paid "
    "plan if you would like to continue usage."
)
DAILY_LIMIT_4006 = (
    "AiError: AiError: you have used up your daily free allocation of 10,000 neurons, please upgrade to "
    "Cloudflare's Workers Paid plan if you would like to continue usage. ({id})"
)
INTERNAL_MESSAGE = "Internal server error"


def _error(status: int, code: int, message: str) -> Callable[[], ApiError]:
    return lambda: ApiError(status, code, message.format(id=uuid.uuid4().hex[:8]))


# Each error fault by its name and by its code.
ERRORS: dict[str, Callable[[], ApiError]] = {
    "capacity": _error(429, 3040, CAPACITY_EXCEEDED),
    "daily-limit": _error(429, 3036, DAILY_LIMIT),
    "4006": _error(429, 4006, DAILY_LIMIT_4006),
    "timeout": _error(408, 3007, "Request timeout"),
    "aborted": _error(408, 3008, "Request was aborted"),
    "internal": _error(500, INTERNAL, INTERNAL_MESSAGE),
}
CODES = {"3040": "capacity", "3036": "daily-limit", "3007": "timeout", "3008": "aborted", str(INTERNAL): "internal"}


@dataclass(frozen=True)
class Fault:
    name: str  # a key of ERRORS, or stream-N
    cut_after: int | None = None  # for stream-N: the pieces of text sent before the final error event

    @classmethod
    def parse(cls, text: str) -> Fault:
        """A fault by name (capacity, daily-limit, timeout, aborted, internal, stream-N) or code (3040, 3036, 4006,
        3007, 3008, 3043); raises ValueError naming the choices."""
        name = CODES.get(text.strip().lower(), text.strip().lower())
        if name in ERRORS:
            return cls(name)
        count = name.removeprefix(STREAM_PREFIX)
        if name.startswith(STREAM_PREFIX) and count.isdigit():
            return cls(name, int(count))
        choices = ", ".join([*ERRORS, *CODES, "stream-N"])
        raise ValueError(f"unknown fault {text!r}: one of {choices}")

    def error(self) -> ApiError | None:
        return None if self.cut_after is not None else ERRORS[self.name]()


class FaultPlan:
    """The server's drawn faults: `FAULT:RATE[,FAULT:RATE...]`, rates summing to at most 1, one draw per run request."""

    def __init__(self, spec: str, seed: int) -> None:
        self.rates: list[tuple[Fault, float]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, rate = part.rpartition(":")
            try:
                value = float(rate)
            except ValueError:
                raise ValueError(f"--fault {part!r}: the rate after ':' must be a number from 0 to 1") from None
            if not name or not 0 <= value <= 1:
                raise ValueError(f"--fault {part!r}: write FAULT:RATE, the rate from 0 to 1 (capacity:0.1)")
            self.rates.append((Fault.parse(name), value))
        if sum(rate for _, rate in self.rates) > 1:
            raise ValueError(f"--fault {spec!r}: the rates add up to more than 1")
        self.random = random.Random(seed)

    def draw(self) -> Fault | None:
        if not self.rates:
            return None
        point = self.random.random()
        for fault, rate in self.rates:
            if point < rate:
                return fault
            point -= rate
        return None


class StreamCut(Exception):
    """Raised through the streaming response once the final error event is sent: it stops the answer's stream."""


def _is_text(frame: bytes, surface: Surface) -> bool:
    """Whether an event carries a piece of generated text (not the role, tool-call, usage or [DONE] event)."""
    try:
        payload = json.loads(frame.removeprefix(b"data: "))
    except ValueError:
        return False
    if not isinstance(payload, dict):
        return False
    if not surface.openai:
        return bool(payload.get("response"))
    choice = (payload.get("choices") or [{}])[0]
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


class StreamCutter:
    """A `send` that passes a streamed answer through event by event and, after `limit` pieces of text, sends the
    surface's final error event, ends the body and raises StreamCut. Answers that are not streams pass untouched."""

    def __init__(self, send: Send, surface: Surface, limit: int) -> None:
        self._send = send
        self.surface = surface
        self.limit = limit
        self.streaming = False
        self.sent = 0
        self.pending = b""

    def final_event(self) -> bytes:
        if self.surface.openai:
            return openai.failure_event(INTERNAL_MESSAGE)
        return workers_ai.failure_event(INTERNAL_MESSAGE)

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
            self.streaming = content_type.startswith("text/event-stream")
        if not self.streaming or message["type"] != "http.response.body":
            await self._send(message)
            return
        self.pending += message.get("body", b"")
        out = b""
        while self.sent < self.limit and b"\n\n" in self.pending:
            frame, _, self.pending = self.pending.partition(b"\n\n")
            out += frame + b"\n\n"
            self.sent += _is_text(frame, self.surface)
        if self.sent >= self.limit:
            await self._send({"type": "http.response.body", "body": out + self.final_event(), "more_body": False})
            raise StreamCut
        more = message.get("more_body", False)
        if not more:
            out, self.pending = out + self.pending, b""
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})


class FaultInjector:
    """The ASGI layer: a run request's fault from its header, else from the server's plan; others pass through."""

    def __init__(self, app: ASGIApp, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        surface = run_surface(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if surface is None:
            await self.app(scope, receive, send)
            return
        named = Headers(scope=scope).get(FAULT_HEADER)
        try:
            fault = self._fault(named)
        except ValueError as exc:
            await surface.error(bad_input(f"Error: {FAULT_HEADER}: {exc}"))(scope, receive, send)
            return
        if fault is None:
            await self.app(scope, receive, send)
            return
        log.info("fault %s on %s %s (%s)", fault.name, scope["method"], scope["path"], "asked" if named else "drawn")
        error = fault.error()
        if error is not None:
            await surface.error(error)(scope, receive, send)
            return
        assert fault.cut_after is not None
        try:
            await self.app(scope, receive, StreamCutter(send, surface, fault.cut_after))
        except StreamCut:
            generation = scope.get("state", {}).get("generation")
            if generation is not None:
                generation.cancel()  # the model stops with the stream

    def _fault(self, named: str | None) -> Fault | None:
        if named is None:
            return self.plan.draw()
        if named.strip().lower() == NO_FAULT:
            return None
        return Fault.parse(named)


def layer(settings: Settings) -> list[Middleware]:
    """The fault layer: always on for the header; exits naming the mistake on a bad --fault."""
    try:
        plan = FaultPlan(settings.fault, settings.fault_seed)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return [Middleware(FaultInjector, plan=plan)]
