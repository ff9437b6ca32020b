"""What a caller holds for a submitted request: an async stream of text pieces, its usage and its timings.

The engine thread feeds it through `deliver`; everything else runs on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused rather than recomputed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class FinishReason(Enum):
    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_tokens, or the slot's context, ran out
    CANCELLED = "cancelled"


class GenerationFailed(Exception):
    pass


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = str | Finished | Failed


class Generation:
    """A submitted request: iterate for text pieces, then read `usage` and `finish_reason`."""

    def __init__(self, prompt_tokens: int, max_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        # Written by the engine thread as tokens are made, so a request log can read it after a disconnect.
        self.completion_tokens = 0
        self.cached_tokens = 0
        # llama_decode calls that computed part of the prompt: one on an idle server, more where prompt blocks were
        # computed beside running streams under the stall bound (written by the engine thread).
        self.prompt_calls = 0
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_piece_at: float | None = None
        self.piece_gaps: list[float] = []  # seconds between consecutive text pieces
        # Seconds between the engine's steps that made this request's tokens (written by the engine thread): a
        # token that completes no character makes no piece, so one piece gap can span two of these.
        self.token_gaps: list[float] = []
        self.on_cancel: Callable[[], None] | None = None
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    @property
    def time_to_first_piece(self) -> float | None:
        return None if self.first_piece_at is None else self.first_piece_at - self.submitted_at

    def cancel(self) -> None:
        """Stop at the engine's next step (or leave the queue) and free the slot; safe to call more than once."""
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        last = None
        while self.finish_reason is None:
            event = await self._events.get()
            if isinstance(event, str):
                now = time.perf_counter()
                if last is None:
                    self.first_piece_at = now
                else:
                    self.piece_gaps.append(now - last)
                last = now
                yield event
            elif isinstance(event, Finished):
                self.completion_tokens = event.completion_tokens
                self.finish_reason = event.reason
            else:
                raise GenerationFailed(event.message)

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def deliver(self, event: Event) -> None:
        """Hand an event to the caller's loop; called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop has shut down; nobody is listening any more
