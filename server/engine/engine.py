"""The engine: one thread owns the llama.cpp model and context and serves every request through slots.

Requests become jobs; the engine thread admits them into free slots and runs one `llama_decode` per step over
every busy slot together: the next token of each generating slot, plus chunks of newly admitted prompts in the
room left over, so a long prompt never stalls the streams already running. Each slot samples with its own
native sampler chain. The asyncio side sees only `Engine.submit`, iteration over a `Generation`, and
`Generation.cancel`.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import llama_cpp as llama

from .chat_template import ChatTemplate
from .llama_model import ContextSettings, DecodeError, LlamaModel
from .sampler import Sampler, SamplingParams

log = logging.getLogger("server.engine")


@dataclass(frozen=True)
class ChatPrompt:
    """Turns rendered through the model's chat template, ending with the assistant's cue."""

    messages: Sequence[Mapping[str, Any]]
    tools: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class TextPrompt:
    """Text sent to the model verbatim, with no template."""

    text: str


Prompt = ChatPrompt | TextPrompt


@dataclass(frozen=True)
class CompletionRequest:
    prompt: Prompt
    sampling: SamplingParams
    max_tokens: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class FinishReason(Enum):
    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # max_tokens, or the slot's context, ran out
    CANCELLED = "cancelled"


class EngineNotReady(Exception):
    pass


class PromptTooLong(Exception):
    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens, but the context window holds {limit}")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class GenerationFailed(Exception):
    pass


@dataclass
class _Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass
class _Failed:
    message: str


class Generation:
    """A submitted request as the asyncio side sees it: iterate for text pieces, then read `usage`."""

    def __init__(self, prompt_tokens: int, max_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue[str | _Finished | _Failed] = asyncio.Queue()

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def cancel(self) -> None:
        """Stop at the engine's next step and free the slot; safe to call at any time, more than once."""
        self.cancelled = True

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        while self.finish_reason is None:
            event = await self._events.get()
            if isinstance(event, str):
                yield event
            elif isinstance(event, _Finished):
                self.completion_tokens = event.completion_tokens
                self.finish_reason = event.reason
            else:
                raise GenerationFailed(event.message)

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    # Called from the engine thread.
    def _deliver(self, event: str | _Finished | _Failed) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop has shut down; nobody is listening any more


@dataclass
class _Job:
    tokens: list[int]
    sampling: SamplingParams
    generation: Generation


@dataclass
class Slot:
    """One sequence in the KV cache, serving one job at a time."""

    seq_id: int
    job: _Job | None = None
    sampler: Sampler | None = None
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next steps
    n_past: int = 0
    n_generated: int = 0
    text: codecs.IncrementalDecoder | None = None

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.n_generated == 0


class EngineState(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Engine:
    """Owns the model. `fetch_model` runs on the engine thread (it may download for minutes); `on_failure` is
    called from that thread if the model cannot be fetched or loaded."""

    def __init__(
        self,
        fetch_model: Callable[[], Path],
        settings: ContextSettings,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.fetch_model = fetch_model
        self.settings = settings
        self.on_failure = on_failure
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.model: LlamaModel | None = None
        self.template: ChatTemplate | None = None
        self._incoming: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._slots: list[Slot] = []

    # -- asyncio side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._incoming.put(None)
        if self.state is EngineState.LOADING:
            return  # a download may take minutes; the daemon thread ends with the process
        self._thread.join()

    @property
    def slots(self) -> int:
        return len(self._slots)

    @property
    def busy_slots(self) -> int:
        """Slots serving a request right now (read without locking: a snapshot for monitoring)."""
        return sum(1 for slot in self._slots if slot.job is not None)

    @property
    def context_per_slot(self) -> int:
        return self.model.n_ctx_seq if self.model else 0

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        """The tokens a prompt becomes. Thread-safe: reads only the vocabulary."""
        if self.model is None or self.template is None:
            raise EngineNotReady(self.error or "the model is still loading")
        if isinstance(prompt, TextPrompt):
            return self.model.tokenize(prompt.text)
        return self.model.tokenize(self.template.render(prompt.messages, prompt.tools))

    async def submit(self, request: CompletionRequest) -> Generation:
        """Queue a request; raises PromptTooLong (before anything is generated) when it cannot fit."""
        if self.state is not EngineState.READY:
            raise EngineNotReady(self.error or "the model is still loading")
        tokens = await asyncio.to_thread(self.prompt_tokens, request.prompt)
        room = self.context_per_slot - len(tokens)
        if room < 1:
            raise PromptTooLong(len(tokens), self.context_per_slot)
        generation = Generation(len(tokens), min(request.max_tokens, room), asyncio.get_running_loop())
        self._incoming.put(_Job(tokens, request.sampling, generation))
        return generation

    # -- engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            path = self.fetch_model()
            self.model = LlamaModel(path, self.settings)
            self.template = ChatTemplate(
                self.model.chat_template(),
                bos_token=self.model.token_text(self.model.bos),
                eos_token=self.model.token_text(llama.llama_vocab_eos(self.model.vocab)),
            )
        except Exception as exc:
            self.error = f"the model could not be loaded: {exc}"
            self.state = EngineState.FAILED
            log.error("%s", self.error)
            if self.on_failure:
                self.on_failure(self.error)
            return
        log.info(
            "model ready: %s (%s), context %d tokens x %d slots, %d threads%s",
            path.name,
            self.model.description,
            self.model.n_ctx_seq,
            self.model.n_seq,
            self.model.n_threads,
            ", all layers on the GPU" if self.model.gpu_offload else "",
        )
        slots = self._slots = [Slot(seq_id=i) for i in range(self.model.n_seq)]
        batch = llama.llama_batch_init(self.model.n_batch, 0, 1)
        self.state = EngineState.READY
        try:
            while not self._stopping:
                self._admit(slots)
                if any(slot.job for slot in slots):
                    self._step(slots, batch)
        finally:
            for slot in slots:
                if slot.job:
                    self._finish(slot, _Failed("the server is shutting down"))
            llama.llama_batch_free(batch)
            self.model.close()
            self.state = EngineState.STOPPED

    def _admit(self, slots: list[Slot]) -> None:
        idle = all(slot.job is None for slot in slots)
        for slot in slots:
            if slot.job is not None:
                continue
            try:
                # Block only when there is nothing else to do.
                job = self._incoming.get(timeout=None) if idle else self._incoming.get_nowait()
            except queue.Empty:
                return
            idle = False
            if job is None:
                self._stopping = True
                return
            if job.generation.cancelled:
                job.generation._deliver(_Finished(FinishReason.CANCELLED, 0))
                continue
            self._assign(slot, job)

    def _assign(self, slot: Slot, job: _Job) -> None:
        assert self.model is not None
        slot.job = job
        slot.sampler = Sampler(self.model, job.sampling)
        slot.pending = list(job.tokens)
        slot.n_past = 0
        slot.n_generated = 0
        slot.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.model.forget(slot.seq_id)

    def _step(self, slots: list[Slot], batch: llama.llama_batch) -> None:
        assert self.model is not None
        for slot in slots:
            if slot.job and slot.job.generation.cancelled:
                self._finish(slot, _Finished(FinishReason.CANCELLED, slot.n_generated))

        budget = self.model.n_batch
        outputs: list[tuple[Slot, int]] = []
        n = 0
        # Generating slots first, one token each, so running streams advance every step; prompts share the rest.
        for slot in sorted((s for s in slots if s.job), key=lambda s: s.prefilling):
            take = min(len(slot.pending), budget - n)
            if take <= 0:
                continue
            for i, token in enumerate(slot.pending[:take]):
                batch.token[n] = token
                batch.pos[n] = slot.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                n += 1
            del slot.pending[:take]
            slot.n_past += take
            if not slot.pending:
                batch.logits[n - 1] = True
                outputs.append((slot, n - 1))
        batch.n_tokens = n

        try:
            self.model.decode(batch)
        except DecodeError as exc:
            log.error("decode failed: %s", exc)
            for slot in slots:
                if slot.job:
                    self._finish(slot, _Failed(f"generation failed: {exc}"))
            return

        for slot, index in outputs:
            self._advance(slot, index)

    def _advance(self, slot: Slot, index: int) -> None:
        assert self.model is not None and slot.sampler and slot.text and slot.job
        generation = slot.job.generation
        token = slot.sampler.sample(self.model, index)
        if self.model.is_end_of_generation(token):
            self._finish(slot, _Finished(FinishReason.STOP, slot.n_generated))
            return
        slot.n_generated += 1
        # Written from this thread for the request log, which may read it after the client has gone.
        generation.completion_tokens = slot.n_generated
        text = slot.text.decode(self.model.piece(token))
        if text:
            generation._deliver(text)
        if slot.n_generated >= generation.max_tokens:
            self._finish(slot, _Finished(FinishReason.LENGTH, slot.n_generated))
        else:
            slot.pending.append(token)

    def _finish(self, slot: Slot, outcome: _Finished | _Failed) -> None:
        assert self.model is not None and slot.job is not None
        # Bytes still held by the decoder are a character cut off by max_tokens: dropped, not sent as U+FFFD.
        slot.job.generation._deliver(outcome)
        if slot.sampler:
            slot.sampler.close()
        self.model.forget(slot.seq_id)
        slot.job, slot.sampler, slot.text = None, None, None
        slot.pending = []
