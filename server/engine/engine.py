"""The engine: one thread owns the llama.cpp model and context and serves every request through slots.

Requests become jobs in a bounded wait queue. The engine thread admits them into free slots and, at each step,
advances every generating slot by one token together (continuous batching) and newly admitted prompts by whole
blocks within the step's token budget (sized by `--max-stall-ms` at the measured prompt speed), so a long prompt
never stalls the streams already running for more than a step (prompts that came while those streams' own prompts
were computed take whole batches, as they would have beside them). In the pool layout both go into one
`llama_decode`; in the slots layout (which `--kv-layout auto` picks wherever every slot can hold the whole window)
prompts get calls of their own. Each slot samples with its own native sampler chain.

A slot keeps its KV cache after a request ends. A new request goes to the free slot that already holds the
longest prefix of its prompt (or to its conversation's slot, named by a session key), and only the rest of
the prompt is computed; an exact repeat of a cached prompt computes nothing (the slot kept the logits of the
prompt's last token). In the pool layout all slots share one KV pool (`--kv-size` cells, llama.cpp's unified
cache): a request is admitted when the pool can hold its prompt and its max_tokens beside what running requests
may still come to hold, idle slots' caches giving way least recently used first; until then it waits in the queue.
In the slots layout each slot has a KV stream of its own. A cache serves only requests of the scope that computed
it (a scope per API token where there are several), so no client learns from reuse what another's prompts held.

Before it queues, a request is prepared off the event loop (rendered, tokenized, its grammar compiled): that
counts against the queue's bound, is refused as soon as the prompt is over a size limit or the context window,
and stops between pieces once its caller stops waiting.

The asyncio side sees `Engine.submit`, iteration over a `Generation`, and `Generation.cancel`.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import llama_cpp as llama
import numpy as np

from .chat_template import ChatTemplate
from .completion import Withdrawn
from .generation import Failed, Finished, FinishReason, Generation
from .grammar import PYTHON_TAG, Grammar
from .llama_model import ATTENTION_QUERY_TILE, AdapterError, ContextSettings, DecodeError, LlamaModel
from .sampler import Sampler, SamplingParams
from .structured import Constraint, Vocabulary

log = logging.getLogger("workers_ai_local.engine")

# Prompts are computed in blocks of this many tokens, aligned to absolute positions: the unit of prompt work and, in the
# slots layout, of prefix reuse (the pool reuses a prefix to the token). llama.cpp's kernels do not give bit-identical
# results for every split of a prompt (flash attention takes a different path for a handful of queries than for many),
# so a prompt split one way on a cold cache and another way around a reused prefix could sample differently at
# temperature 0. In the slots layout every block is computed as it would be in a call of its own (see _slot_chunk and
# LlamaModel.flash_attention), so every position of a whole block is computed the same way whatever was cached and
# whatever else runs.
# In the pool layout, where attention over the shared cells already ties a request's sums to its neighbours, a call
# takes as many prompt tokens as its budget allows, aligned or not (see _step_pool).
# A CPU computes prompts about as fast in blocks of 64 as of 512 and wastes less of a reused prefix; a GPU needs
# large blocks to be busy. A block is also the least prompt work a step does while streams wait on it, so on a CPU
# it shrinks as the model grows. On two cores the 8B stand-in computes 4 prompt tokens a call in 0.45 s, 8 in
# 1.0 s, 16 in 1.0-1.1 s and 256 in 14.4 s (bare llama_decode): 16 is where a call reaches its speed, and a
# running stream's longest pause (a 16-token block beside its own 0.13-0.19 s step) was 1.52 s (bench/stall.py,
# median of 3; 1.32-1.60). Calls of 4 tokens
# also sum differently from larger ones there (llama.cpp's repacked Q4_K kernels), so no block is that small.
# The size follows from the model alone (never from timings), so the same request splits the same way on every
# start.
GPU_PREFILL_BLOCK = 512
CPU_PREFILL_BLOCKS = ((1_500_000_000, 64), (4_000_000_000, 32), (None, 16))  # (up to this many parameters, block)
# Prompt speed is measured on the calls that compute blocks (at least this many tokens, fewer are too quick to
# time), as a moving average with this weight for the newest.
RATE_WEIGHT = 0.3
MEASURED_PREFILL = 4
# Threads that prepare requests (render, tokenize, compile grammars) at once; more would only share the same cores
# with the engine thread.
PREPARE_THREADS = 2


def prefill_block_for(n_params: int, gpu: bool) -> int:
    if gpu:
        return GPU_PREFILL_BLOCK
    return next(block for limit, block in CPU_PREFILL_BLOCKS if limit is None or n_params <= limit)


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
    session: str | None = None  # requests of one conversation share a key, so they land on its slot
    # Whose cache this request may reuse: requests of different scopes (API tokens) never share a cached prefix,
    # so that neither `cached_tokens` nor timing tells one client what another's prompts held.
    cache_scope: str | None = None
    grammar: Grammar | None = None
    adapter: Path | None = None  # a GGUF LoRA adapter applied to this request alone


class EngineNotReady(Exception):
    pass


class QueueFull(Exception):
    pass


class Busy(Exception):
    """A request that asked not to wait (rejectIfBusy) would have had to."""


class BudgetTooSmall(Exception):
    """The tokens a request may generate cannot hold the shortest answer its grammar allows."""

    def __init__(self, needed: int, available: int, max_tokens: int) -> None:
        limit = f"max_tokens {max_tokens}" if available == max_tokens else f"the {available} tokens the context leaves"
        super().__init__(f"{limit} cannot hold a complete answer: the shortest valid one takes {needed} tokens")
        self.needed = needed
        self.available = available


class PromptTooLong(Exception):
    def __init__(self, prompt_tokens: int, limit: int, at_least: bool = False) -> None:
        size = f"more than {limit}" if at_least else str(prompt_tokens)
        super().__init__(f"the prompt is {size} tokens, but the context window holds {limit}")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class PromptTooLarge(Exception):
    """A prompt over a size limit that is checked before it is tokenized (messages, characters)."""


class PromptEmpty(Exception):
    """A prompt of no tokens at all, for a model with no BOS token to start from."""


@dataclass(eq=False)
class _Job:
    tokens: list[int]
    request: CompletionRequest
    generation: Generation
    grammar: str | None = None  # llguidance's compiled form of request.grammar
    queued: float = field(default_factory=time.perf_counter)
    streaming_since: float | None = None  # when its first token was sampled
    last_token_at: float | None = None  # when its latest token was

    @property
    def cells(self) -> int:
        """KV cells the request may come to hold: its prompt and every token it may generate."""
        return len(self.tokens) + self.generation.max_tokens


@dataclass(frozen=True)
class _Prepared:
    tokens: list[int]
    grammar: str | None = None
    shortest_answer: int = 0  # tokens


@dataclass(eq=False)
class Slot:
    """One sequence in the KV cache, serving one job at a time and remembering what its cache holds."""

    seq_id: int
    job: _Job | None = None
    sampler: Sampler | None = None
    cached: list[int] = field(default_factory=list)  # tokens whose KV is in this sequence, in order
    pending: list[int] = field(default_factory=list)  # tokens to feed at the next steps
    n_generated: int = 0
    text: codecs.IncrementalDecoder | None = None
    session: str | None = None
    cache_scope: str | None = None  # the scope of the request that computed the cached KV
    adapter: Path | None = None  # the adapter the cached KV was computed with
    last_used: int = 0
    # The logits after the last prompt token, kept with the cache: an identical prompt then starts from them and
    # computes nothing (they are exactly what computing it again would give).
    prompt_logits: np.ndarray | None = None
    prompt_length: int = 0

    @property
    def prefilling(self) -> bool:
        return self.job is not None and self.n_generated == 0

    @property
    def reserved(self) -> int:
        """KV cells this slot may come to hold: a running request's prompt and every token it may generate; an
        idle slot's cache (which can be evicted)."""
        return len(self.cached) if self.job is None else self.job.cells

    def keep(self, model: LlamaModel, n: int) -> None:
        """Keep the first `n` cached tokens and drop the rest from the cache, and the prompt's logits with them
        unless the whole prompt is kept."""
        model.forget(self.seq_id, n)
        del self.cached[n:]
        if n < self.prompt_length:
            self.prompt_logits = None

    def repeats(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` is exactly the prompt whose logits this slot kept."""
        return (
            self.prompt_logits is not None
            and self.prompt_length == len(tokens)
            and self.cached[: len(tokens)] == list(tokens)
        )


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def reusable(cached: Sequence[int], prompt: Sequence[int], block: int) -> int:
    """Prompt tokens whose cached KV can serve: the common prefix in whole `block`s, never the last prompt token
    (its logits are where generation starts, so it is always decoded again)."""
    return min(common_prefix(cached, prompt), len(prompt) - 1) // block * block


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
        max_queue: int = 0,
        on_failure: Callable[[str], None] | None = None,
        chat_date: str = "",
        max_stall_ms: int = 1000,
        prefill_block: int = 0,
        max_messages: int = 0,
        max_prompt_chars: int = 0,
    ) -> None:
        """`max_stall_ms`: how long running streams may wait, per step, on newly admitted prompts (0: no bound);
        `prefill_block`: prompt block size (0: chosen from the model and the device); `max_messages`,
        `max_prompt_chars`: the most turns a chat prompt, and characters a rendered prompt, may hold (0: no bound)."""
        self.fetch_model = fetch_model
        self.chat_date = chat_date  # see ChatTemplate: empty keeps prompts the same on any day
        self.settings = settings
        self.max_queue = max_queue  # 0: unbounded
        self.max_messages = max_messages
        self.max_prompt_chars = max_prompt_chars
        # Requests being prepared (rendered, tokenized, their grammar compiled) off the event loop: they count
        # against max_queue like waiting ones, and run in threads of their own pool, never the loop's default one.
        self._preparing = 0
        self._preparer = ThreadPoolExecutor(max_workers=PREPARE_THREADS, thread_name_prefix="prepare")
        self.on_failure = on_failure
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.model: LlamaModel | None = None
        self.template: ChatTemplate | None = None
        self.vocabulary: Vocabulary | None = None  # the model's tokens for grammars
        self._waiting: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._slots: list[Slot] = []
        self._clock = itertools.count(1)
        self.max_stall = max_stall_ms / 1000
        self._requested_block = prefill_block
        self.prefill_block = prefill_block or CPU_PREFILL_BLOCKS[0][1]
        self._prefill_rate: float | None = None  # prompt tokens per second, measured
        self._generate_seconds = 0.0  # what advancing the running streams took in the last step
        # Cumulative, for monitoring: the engine thread's working time (admitting and stepping, never waiting),
        # and the part of it spent inside llama_decode; the rest is this engine's own overhead.
        self.busy_seconds = 0.0
        self.decode_seconds = 0.0

    # -- asyncio side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        # Preparations under way stop at their next check (see _prepare); queued ones never start.
        self._preparer.shutdown(wait=False, cancel_futures=True)
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
    def queue_depth(self) -> int:
        return len(self._waiting)

    def model_metadata(self, key: str) -> str | None:
        """A GGUF metadata value of the loaded model (None while loading, or when absent)."""
        return self.model.metadata(key) if self.model is not None else None

    @property
    def native_tools(self) -> bool:
        """Whether the model's chat template renders tool definitions and calls itself."""
        return self.template is not None and self.template.knows_tools

    @property
    def python_tag(self) -> bool:
        """Whether the model marks calls with Llama 3.1's <|python_tag|> (a control token of its vocabulary)."""
        return self.model is not None and self.model.has_control_token(PYTHON_TAG)

    @property
    def context_window(self) -> int:
        """The longest context (prompt and answer) one request may use."""
        return self.model.context_window if self.model else 0

    @property
    def kv_layout(self) -> str | None:
        """The KV layout in use, `pool` or `slots` (`auto` resolved once the model is loaded)."""
        return self.model.kv_layout if self.model else None

    @property
    def flash_attention(self) -> bool | None:
        """Whether attention runs as llama.cpp's flash attention (see LlamaModel.flash_attention)."""
        return self.model.flash_attention if self.model else None

    @property
    def kv_size(self) -> int:
        """KV cache cells shared by every request."""
        return self.model.kv_size if self.model else 0

    @property
    def kv_reserved(self) -> int:
        """Cells the running requests may come to hold (read without locking: a snapshot for monitoring)."""
        return sum(slot.reserved for slot in self._slots if slot.job is not None)

    def prompt_text(self, prompt: Prompt) -> str:
        """The text a prompt becomes: raw text as is, turns through the model's chat template."""
        if self.model is None or self.template is None:
            raise EngineNotReady(self.error or "the model is still loading")
        if isinstance(prompt, TextPrompt):
            return prompt.text
        return self.template.render(prompt.messages, prompt.tools)

    def _prepare(self, request: CompletionRequest, withdrawn: threading.Event) -> _Prepared:
        """The request's tokens, and its grammar compiled with the shortest answer it allows, checked as they are
        made: a prompt over a size limit or the context window is refused as soon as that is known, and the work
        stops between pieces once the caller has stopped waiting (or the engine is stopping). A grammar that cannot
        be enforced is refused here too, before the request queues, not in the engine loop; so is a budget too
        small for any complete answer."""
        try:

            def gone() -> bool:
                return withdrawn.is_set() or self._stopping

            text = self.prompt_text(request.prompt)
            if self.max_prompt_chars and len(text) > self.max_prompt_chars:
                raise PromptTooLarge(f"the prompt is {len(text)} characters, over the limit of {self.max_prompt_chars}")
            tokens = self._tokens_within(text, self.context_window, gone)
            if request.grammar is None or self.vocabulary is None:
                return _Prepared(tokens)
            compiled = self.vocabulary.compile(request.grammar)
            return _Prepared(tokens, compiled, self.vocabulary.shortest_answer(request.grammar, gone))
        finally:
            with self._wake:
                self._preparing -= 1

    def _tokens_within(self, text: str, limit: int, gone: Callable[[], bool]) -> list[int]:
        """The tokens of a rendered prompt, refused with PromptTooLong as soon as they are more than `limit` (a
        prompt that fills the window leaves no room to answer); an empty one starts from BOS."""
        assert self.model is not None
        tokens: list[int] = []
        pieces = self.model.tokenize_pieces(text)
        for piece in pieces:
            if gone():
                raise Withdrawn("the request was withdrawn while its prompt was tokenized")
            tokens += piece
            if len(tokens) > limit:  # the count is exact where this was the last piece
                raise PromptTooLong(len(tokens), limit, at_least=next(pieces, None) is not None)
        if not tokens:
            if self.model.bos < 0:
                raise PromptEmpty("the prompt is empty, and the model has no token to start from")
            tokens = [self.model.bos]
        return tokens

    async def submit(self, request: CompletionRequest, reject_if_busy: bool = False) -> Generation:
        """Queue a request. Raises PromptTooLarge, PromptTooLong, PromptEmpty, BudgetTooSmall, GrammarError or
        QueueFull at once, before anything is generated; with `reject_if_busy`, Busy where it would wait (see
        `_would_wait`). Cancelling the caller stops the preparation too."""
        prepared = await self._prepared(request)
        tokens = prepared.tokens
        room = self.context_window - len(tokens)
        if room < 1:
            raise PromptTooLong(len(tokens), self.context_window)
        max_tokens = min(request.max_tokens, room)
        if prepared.shortest_answer > max_tokens:
            raise BudgetTooSmall(prepared.shortest_answer, max_tokens, request.max_tokens)
        generation = Generation(len(tokens), max_tokens, asyncio.get_running_loop())
        job = _Job(tokens, request, generation, prepared.grammar)
        with self._wake:
            if reject_if_busy:
                reason = self._would_wait(job, self.slots - self.busy_slots)
                if reason:
                    raise Busy(reason)
            self._refuse_when_full()
            self._waiting.append(job)
            generation.on_cancel = lambda: self._withdraw(job)
            self._wake.notify()
        return generation

    def _would_wait(self, job: _Job, free_slots: int) -> str:
        """Why `job` could not start at the engine's next admission, or "" if it could (called holding the lock).
        Admission is first come, first served: the requests already waiting take the free slots, and in the pool
        layout the cells, before this one; idle slots' caches give way, so only running and waiting requests count."""
        if len(self._waiting) >= free_slots:
            return f"all {self.slots} slots are taken" + (
                f" and {len(self._waiting)} requests are waiting" if self._waiting else ""
            )
        assert self.model is not None
        if self.model.shared_pool:
            claimed = self.kv_reserved + sum(waiting.cells for waiting in self._waiting)
            if claimed + job.cells > self.model.kv_size:
                return f"the KV pool holds {self.model.kv_size} tokens and {claimed} are claimed"
        return ""

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """The tokens a prompt becomes, prepared as a request's are (queued, bounded, cancellable)."""
        request = CompletionRequest(prompt, SamplingParams(), max_tokens=1)
        return (await self._prepared(request)).tokens

    async def _prepared(self, request: CompletionRequest) -> _Prepared:
        if self.state is not EngineState.READY:
            raise EngineNotReady(self.error or "the model is still loading")
        if (
            isinstance(request.prompt, ChatPrompt)
            and self.max_messages
            and len(request.prompt.messages) > self.max_messages
        ):
            raise PromptTooLarge(
                f"the prompt has {len(request.prompt.messages)} messages, over the limit of {self.max_messages}"
            )
        with self._wake:
            self._refuse_when_full()
            self._preparing += 1
        withdrawn = threading.Event()
        try:
            future = self._preparer.submit(self._prepare, request, withdrawn)
        except RuntimeError as exc:  # the pool is shut down: the engine is stopping
            with self._wake:
                self._preparing -= 1
            raise EngineNotReady("the server is shutting down") from exc
        try:
            return await asyncio.wrap_future(future)
        except Withdrawn as exc:
            raise EngineNotReady("the server is shutting down") from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._stopping and task is not None and not task.cancelling():  # the pool dropped it, not the caller
                raise EngineNotReady("the server is shutting down") from exc
            raise
        finally:
            withdrawn.set()  # the caller is done waiting, answered or cancelled: nothing more to do
            if future.cancel():  # never started (queued behind others): _prepare will not count itself out
                with self._wake:
                    self._preparing -= 1

    def _refuse_when_full(self) -> None:
        """QueueFull when the requests waiting for a slot or being prepared fill the queue (called holding the lock)."""
        waiting = len(self._waiting) + self._preparing
        if self.max_queue and waiting - (self.slots - self.busy_slots) >= self.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting")

    def _withdraw(self, job: _Job) -> None:
        # A request whose client left while it waited never takes a slot. One already in a slot is
        # stopped by the engine thread at its next step, which sees `cancelled`.
        with self._wake:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job.generation.deliver(Finished(FinishReason.CANCELLED, 0))

    # -- engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            path = self.fetch_model()
            self.model = LlamaModel(path, self.settings)
            self.template = ChatTemplate(
                self.model.chat_template(),
                bos_token=self.model.token_text(self.model.bos),
                eos_token=self.model.token_text(llama.llama_vocab_eos(self.model.vocab)),
                date=self.chat_date,
            )
            self.vocabulary = Vocabulary(self.model)
        except Exception as exc:
            self.error = f"the model could not be loaded: {exc}"
            self.state = EngineState.FAILED
            log.error("%s", self.error)
            if self.on_failure:
                self.on_failure(self.error)
            return
        log.info(
            "model ready: %s (%s), %s of %d tokens (%s) for %d requests at once, up to %d tokens each, %d threads%s",
            path.name,
            self.model.description,
            "one KV pool" if self.model.shared_pool else f"KV cache in {self.model.n_seq} slots",
            self.model.kv_size,
            self.model.cache_type,
            self.model.n_seq,
            self.model.context_window,
            self.model.n_threads,
            ", all layers on the GPU" if self.model.gpu_offload else "",
        )
        self.prefill_block = self._requested_block or prefill_block_for(self.model.n_params, self.model.gpu_offload)
        log.info(
            "prompts in blocks of %d tokens, attention %s",
            self.prefill_block,
            "as llama.cpp chooses" if self.model.flash_attention else "without flash attention: sums alike in any call",
        )
        log.info("memory: %s", self.model.memory_report)
        slots = self._slots = [Slot(seq_id=i) for i in range(self.model.n_seq)]
        batch = llama.llama_batch_init(self.model.n_batch, 0, 1)
        self.state = EngineState.READY
        try:
            while self._admit(slots):
                started = time.perf_counter()
                self._step(slots, batch)
                self.busy_seconds += time.perf_counter() - started
        finally:
            for slot in slots:
                if slot.job:
                    self._finish(slot, Failed("the server is shutting down"))
            llama.llama_batch_free(batch)
            self.model.close()
            self.state = EngineState.STOPPED

    def _admit(self, slots: list[Slot]) -> bool:
        """Move waiting jobs into free slots, sleeping while there is nothing at all to do. False: stop."""
        with self._wake:
            while not self._stopping and not self._waiting and not any(slot.job for slot in slots):
                self._wake.wait()
            if self._stopping:
                return False
            started = time.perf_counter()
            self._admit_waiting(slots)
            self.busy_seconds += time.perf_counter() - started
        return True

    def _admit_waiting(self, slots: list[Slot]) -> None:
        """Move waiting jobs into free slots while there are any (called holding the lock)."""
        while self._waiting:
            free = [slot for slot in slots if slot.job is None]
            if not free:
                break
            job = self._waiting[0]
            slot = self._pick_slot(slots, free, job)
            if not self._make_room(slots, slot, job):
                break  # it waits, first in line, for running requests to give cells back
            self._waiting.popleft()
            try:
                self._assign(slot, job)
            except Exception as exc:  # a request the engine cannot serve fails alone, never the engine
                log.exception("request failed on admission")
                failure = Failed(f"the request could not be started: {exc}")
                if slot.job is job:
                    self._finish(slot, failure)
                else:
                    job.generation.deliver(failure)

    def _make_room(self, slots: list[Slot], chosen: Slot, job: _Job) -> bool:
        """Whether the pool can hold `job` in `chosen` along with what the running requests may come to hold,
        evicting idle slots' caches, least recently used first, to make it so."""
        assert self.model is not None
        if not self.model.shared_pool:
            return True  # each slot has its own stream, as long as any request may be
        need = job.cells
        running = self.kv_reserved
        if running + need > self.model.kv_size:
            return False
        idle = sorted((s for s in slots if s.job is None and s is not chosen and s.cached), key=lambda s: s.last_used)
        held = sum(len(s.cached) for s in idle)
        while idle and running + need + held > self.model.kv_size:
            evicted = idle.pop(0)
            held -= len(evicted.cached)
            evicted.keep(self.model, 0)
        return True

    def _pick_slot(self, slots: list[Slot], free: list[Slot], job: _Job) -> Slot:
        session = job.request.session
        if session is not None:
            for slot in free:
                if slot.session == session and slot.cache_scope == job.request.cache_scope:
                    return slot
        # The strongest claim wins (see _claim); among equals, a slot no conversation claims; then, in the slots layout,
        # the one that leaves the busy slots in the fewest runs of consecutive sequence ids: llama.cpp decodes only
        # consecutive streams in one pass, so every gap costs a pass over the weights (measured on the embedded model: 8
        # streams spread over 16 slots take 1.7x the step of 8 packed ones). Then an empty slot, then the least recently
        # used (so that conversations taking turns do not evict each other's prefixes), then the lowest sequence id. In
        # the pool layout one pass takes any sequences, and packing is not weighed.
        busy = {s.seq_id for s in slots if s.job is not None}

        def runs_with(slot: Slot) -> int:
            if self.model is None or self.model.shared_pool:
                return 0
            ids = busy | {slot.seq_id}
            return sum(1 for i in ids if i - 1 not in ids)

        return max(
            free,
            key=lambda s: (
                self._claim(s, job),
                s.session is None,
                -runs_with(s),
                not s.cached,
                -s.last_used,
                -s.seq_id,
            ),
        )

    def _claim(self, slot: Slot, job: _Job) -> int:
        """How many of the job's prompt tokens a free slot's cache would serve, for choosing the slot: whole blocks in
        common, or in the pool every token in common where the prompt extends all the slot holds (a conversation's
        next turn, however short). A few tokens in common with a longer history (a short system prompt's turn) claim
        nothing, so a new chat does not evict another conversation to save them."""
        assert self.model is not None
        tokens = self._reusable(slot, job, 1)  # one pass over the common prefix per slot
        if self.model.shared_pool and tokens >= len(slot.cached):
            return tokens
        # Whole blocks of it; an exact repeat (every prompt token, served from the kept logits) counts whole.
        return tokens if tokens == len(job.tokens) else tokens // self.prefill_block * self.prefill_block

    def _reusable(self, slot: Slot, job: _Job, block: int) -> int:
        """Prompt tokens of `job` the slot's cache can serve, the common prefix in whole `block`s."""
        # KV computed under one adapter is wrong under another; another scope's is not this request's to see.
        if slot.adapter != job.request.adapter or slot.cache_scope != job.request.cache_scope:
            return 0
        if slot.repeats(job.tokens):
            return len(job.tokens)
        return reusable(slot.cached, job.tokens, block)

    def _assign(self, slot: Slot, job: _Job) -> None:
        assert self.model is not None
        # Only the slots layout promises outputs independent of what was cached, and only by reusing whole blocks
        # (see Determinism). In the pool every cached token serves, as in llama-server: a chat's system prompt or a
        # conversation's history is reused to the token, not up to 15 tokens short of it (a second on the 8B).
        reuse = self._reusable(slot, job, 1 if self.model.shared_pool else self.prefill_block)
        slot.keep(self.model, reuse)
        slot.pending = job.tokens[reuse:]
        slot.job = job
        constraint = None
        if job.grammar is not None:  # compiled by _prepare, from request.grammar with the vocabulary
            assert job.request.grammar is not None and self.vocabulary is not None
            constraint = Constraint(self.vocabulary, job.grammar, job.request.grammar, self.model)
        slot.sampler = Sampler(self.model, job.request.sampling, constraint)
        slot.n_generated = 0
        slot.text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        slot.session = job.request.session
        slot.cache_scope = job.request.cache_scope
        slot.adapter = job.request.adapter
        slot.last_used = next(self._clock)
        job.generation.cached_tokens = reuse
        if not slot.pending:  # the whole prompt was cached, with its logits: the answer starts at once
            assert slot.prompt_logits is not None
            self._advance(slot, slot.prompt_logits.copy())

    def _step(self, slots: list[Slot], batch: llama.llama_batch) -> None:
        assert self.model is not None
        for slot in slots:
            if slot.job and slot.job.generation.cancelled:
                self._finish(slot, Finished(FinishReason.CANCELLED, slot.n_generated))

        # Every running stream advances one token per step; requests with different LoRA adapters never share a
        # decode call (the context applies one adapter set to a whole batch). A grammar's forced tokens go in with
        # the sampled one, each slot's share of the batch at most.
        generating: dict[Path | None, list[Slot]] = {}
        for slot in slots:
            if slot.job and not slot.prefilling:
                generating.setdefault(slot.adapter, []).append(slot)
        share = max(1, self.model.n_batch // max(1, sum(len(group) for group in generating.values())))
        streams = {adapter: [(slot, slot.pending[:share]) for slot in group] for adapter, group in generating.items()}
        if self.model.shared_pool:
            self._step_pool(slots, streams, batch)
        else:
            self._step_slots(slots, streams, batch)

    def _step_pool(
        self, slots: list[Slot], streams: dict[Path | None, list[tuple[Slot, list[int]]]], batch: llama.llama_batch
    ) -> None:
        """Pool layout: per adapter, one decode call holds the running streams' tokens and as many of newly admitted
        prompts' tokens as the step's budget allows (under the stall bound, what brings the call to whole blocks:
        at least one token, so prompts always advance). The weights are read once per step, and an idle server
        computes a prompt in calls of a whole batch. llama.cpp takes such a batch in one pass whatever its
        sequences hold; attention spans the pool's cells anyway, so what runs beside a request can already change
        its output in rare near-ties (see docs/determinism.md)."""
        assert self.model is not None
        stream_rows = sum(len(tokens) for work in streams.values() for _, tokens in work)
        prefilling, budget = self._prompt_work(slots, streams)
        if stream_rows and budget < self.model.n_batch:
            # Under the stall bound the call's rows, the streams' and the prompts' together, come to whole blocks:
            # ggml's CPU matrix kernels take rows in groups, and a call of one row more costs far more than a row.
            # On the 8B stand-in (pool, 2 cores) a call of 16 rows took 1.21 s, of 17 1.47 s and of 15 1.56 s, so
            # a stream's token and 15 prompt tokens take a step 0.26 s shorter than its token and a block of 16.
            budget = max(1, (stream_rows + budget) // self.prefill_block * self.prefill_block - stream_rows)
        budget = min(self.model.n_batch - stream_rows, budget)
        prompts: dict[Path | None, list[tuple[Slot, list[int]]]] = {}
        for slot in prefilling:
            if budget <= 0:
                break
            size = min(len(slot.pending), budget)
            budget -= size
            prompts.setdefault(slot.adapter, []).append((slot, slot.pending[:size]))
        for adapter in list(streams) + [a for a in prompts if a not in streams]:
            stream_work, prompt_work = streams.get(adapter, []), prompts.get(adapter, [])
            if not self._use_adapter(adapter, [slot for slot, _ in stream_work + prompt_work]):
                continue
            seconds = self._decode(batch, stream_work + prompt_work)
            prompt_tokens = sum(len(tokens) for _, tokens in prompt_work)
            if not prompt_work:
                self._generate_seconds = seconds
            elif stream_work:  # what the prompt tokens added to the streams' own step is the speed that counts
                self._measure_prefill(prompt_tokens, seconds - self._generate_seconds)
            else:
                self._measure_prefill(prompt_tokens, seconds)

    def _step_slots(
        self, slots: list[Slot], streams: dict[Path | None, list[tuple[Slot, list[int]]]], batch: llama.llama_batch
    ) -> None:
        """Slots layout: the running streams in one decode call per adapter, then prompts by whole blocks within
        the step's budget (see _slot_chunk). llama.cpp gives each sequence its own attention stream here and
        splits a batch into equal shares per sequence, so a slot's chunk shares a call only with chunks of its own
        length: each block is then computed exactly as it would be alone, whatever else runs and whatever was
        cached. With no stream running the largest group of equal chunks goes first (the most tokens per pass over
        the weights); beside running streams the first admitted prompt's does, so its stream starts soonest (by
        size, three newcomers' last, shorter blocks on the 8B stand-in waited behind every whole block of the
        others, and all three first tokens came together at the end, 58-62 s in). With no stream running a step
        is one call: requests that arrived during it are admitted before the next, and their prompts join the
        others' in shared calls, as llama-server batches prompts that arrive together, instead of running one by
        one beside a stream that started a call earlier."""
        assert self.model is not None
        self._generate_seconds = 0.0
        for adapter, work in streams.items():
            if self._use_adapter(adapter, [slot for slot, _ in work]):
                self._generate_seconds += self._decode(batch, work)
        prefilling, budget = self._prompt_work(slots, streams)
        while budget > 0:
            chunks: dict[tuple[int, Path | None], list[Slot]] = {}
            for slot in (s for s in prefilling if s.prefilling):  # a prompt done in this step is a stream now
                size = self._slot_chunk(slot, budget)
                if size:
                    chunks.setdefault((size, slot.adapter), []).append(slot)
            if not chunks:
                return
            if streams:  # the first admitted prompt's chunk (dicts keep order), so its stream starts soonest
                (size, adapter), group = next(iter(chunks.items()))
            else:  # the most tokens per pass over the weights
                (size, adapter), group = max(chunks.items(), key=lambda chunk: chunk[0][0] * len(chunk[1]))
            group = group[: max(1, budget // size)]
            if size * len(group) > budget:
                return
            budget -= size * len(group)
            if self._use_adapter(adapter, group):
                group.sort(key=lambda s: s.seq_id)  # consecutive ids share a micro-batch (see _pick_slot)
                seconds = self._decode(batch, [(slot, slot.pending[:size]) for slot in group])
                self._measure_prefill(size * len(group), seconds)
            if not streams:
                return

    def _prefilling(self, slots: list[Slot]) -> list[Slot]:
        """Slots computing their prompt, first admitted first."""
        return sorted((s for s in slots if s.job and s.prefilling), key=lambda s: s.last_used)

    def _measure_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < MEASURED_PREFILL:
            return  # too few tokens to time
        rate = tokens / max(seconds, 1e-3)
        previous = self._prefill_rate
        self._prefill_rate = rate if previous is None else (1 - RATE_WEIGHT) * previous + RATE_WEIGHT * rate

    def _prompt_work(
        self, slots: list[Slot], streams: dict[Path | None, list[tuple[Slot, list[int]]]]
    ) -> tuple[list[Slot], int]:
        """The prompts this step computes, first admitted first, and how many of their tokens it may take.

        The stall bound protects a stream from prompts that came after it started. A prompt queued before every
        running stream's first token came while their own prompts were computed: a moment sooner and it would have
        shared their calls, and it kept no client waiting that was not waiting for a first token anyway. Such
        prompts go first and alone, a whole batch a step, as llama-server takes every prompt, so requests that
        arrive together start their streams at most a step apart, and a lone prompt goes in whole batches. (Before,
        an idle server held back each prompt's last piece while another prompt had work left: a lone prompt paid a
        call for it. The 8B stand-in took 28.55 s for 512 prompt tokens in one call, 29.57 s for 511 and then 1,
        29.36 s for 496 and then 16.)"""
        prefilling = self._prefilling(slots)
        running = [slot.job for work in streams.values() for slot, _ in work if slot.job]
        if running:
            first_token = min(job.streaming_since or 0.0 for job in running)
            awaited = [slot for slot in prefilling if slot.job and slot.job.queued < first_token]
            if awaited:
                return awaited, self._stall_budget(streams_waiting=False)
        return prefilling, self._stall_budget(streams_waiting=bool(streams))

    def _stall_budget(self, streams_waiting: bool) -> int:
        """Prompt tokens a step may compute: as many as fit in the stall bound at the measured prompt speed while
        streams wait on the step (at least one block, so prompts always advance), else a whole batch."""
        assert self.model is not None
        if not streams_waiting or not self.max_stall:
            return self.model.n_batch
        room = self.max_stall - self._generate_seconds
        fitting = int(self._prefill_rate * room) if self._prefill_rate and room > 0 else 0
        return min(self.model.n_batch, max(self.prefill_block, fitting))

    def _slot_chunk(self, slot: Slot, budget: int) -> int:
        """Slots layout: the slot's prompt tokens for its next call. As many whole blocks as `budget` allows, each
        computed as it would be in a call of its own: under flash attention, blocks under ATTENTION_QUERY_TILE
        tokens share a call only while it stays under that many (ggml's CPU kernel sums a query differently from
        there on), larger ones any number; without it (see LlamaModel.flash_attention) any number. Otherwise the
        next block alone, which is also how a prompt's last, shorter block always goes."""
        assert self.model is not None
        block = self.prefill_block
        if len(slot.cached) % block:
            return self._next_block(slot)
        per_call = max(1, budget // block)
        if block < ATTENTION_QUERY_TILE and self.model.flash_attention:
            per_call = min(per_call, max(1, (ATTENTION_QUERY_TILE - 1) // block))
        whole = min(len(slot.pending) // block, per_call)
        return whole * block if whole else self._next_block(slot)

    def _next_block(self, slot: Slot) -> int:
        """How many prompt tokens the slot's next block holds: up to the next block boundary."""
        block_end = (len(slot.cached) // self.prefill_block + 1) * self.prefill_block
        return min(block_end - len(slot.cached), len(slot.pending))

    def _use_adapter(self, adapter: Path | None, group: list[Slot]) -> bool:
        assert self.model is not None
        try:
            self.model.use_adapter(adapter)
        except AdapterError as exc:
            for slot in group:
                self._finish(slot, Failed(str(exc)))
            return False
        return True

    def _decode(self, batch: llama.llama_batch, work: list[tuple[Slot, list[int]]]) -> float:
        """One llama_decode over `work`; each slot whose pending tokens all went in samples its next token.
        Returns the seconds llama_decode took."""
        assert self.model is not None
        n = 0
        outputs: list[tuple[Slot, int]] = []
        for slot, tokens in work:
            if slot.prefilling and slot.job:
                slot.job.generation.prompt_calls += 1
            position = len(slot.cached)
            for i, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = position + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = False
                n += 1
            slot.cached.extend(tokens)
            del slot.pending[: len(tokens)]
            if not slot.pending:
                batch.logits[n - 1] = True
                outputs.append((slot, n - 1))
        batch.n_tokens = n
        started = time.perf_counter()
        try:
            self.model.decode(batch)
        except DecodeError as exc:
            log.error("decode failed: %s", exc)
            for slot, _ in work:
                if slot.job:
                    self._finish(slot, Failed(f"generation failed: {exc}"))
            return 0.0
        seconds = time.perf_counter() - started
        self.decode_seconds += seconds
        for slot, index in outputs:
            if slot.prefilling:
                slot.prompt_logits = self.model.logits(index).copy()
                slot.prompt_length = len(slot.cached)
            try:
                self._advance(slot, index)
            except Exception as exc:  # a sampler that fails ends its own request, never the engine
                log.exception("sampling failed")
                if slot.job is not None:
                    self._finish(slot, Failed(f"generation failed: {exc}"))
        return seconds

    def _advance(self, slot: Slot, logits: int | np.ndarray) -> None:
        """Sample from `logits` (an output of the last decode, or a copy kept with the cache) and deliver."""
        assert self.model is not None and slot.sampler and slot.text and slot.job
        generation = slot.job.generation
        now = time.perf_counter()
        if slot.job.last_token_at is None:
            slot.job.streaming_since = now
        else:  # what a stream waits on the engine, a token that completes no character included
            generation.token_gaps.append(now - slot.job.last_token_at)
        slot.job.last_token_at = now
        step = slot.sampler.next(self.model, logits, generation.max_tokens - slot.n_generated)
        for token in step.tokens:
            if self.model.is_end_of_generation(token):
                self._finish(slot, Finished(FinishReason.STOP, slot.n_generated))
                return
            slot.n_generated += 1
            generation.completion_tokens = slot.n_generated
            text = slot.text.decode(self.model.piece(token))
            if text:
                generation.deliver(text)
        if step.ended or slot.n_generated >= generation.max_tokens:
            self._finish(slot, Finished(FinishReason.LENGTH, slot.n_generated))
        elif slot.sampler.finished:
            self._finish(slot, Finished(FinishReason.STOP, slot.n_generated))
        else:
            slot.pending.extend(step.tokens)

    def _finish(self, slot: Slot, outcome: Finished | Failed) -> None:
        assert self.model is not None and slot.job is not None
        # Bytes still held by the decoder are a character cut off by max_tokens: dropped, not sent as U+FFFD.
        slot.job.generation.deliver(outcome)
        if slot.sampler:
            slot.sampler.close()
        if isinstance(outcome, Failed):
            # What the failed decode left in the cache is unknown; start this slot afresh.
            slot.keep(self.model, 0)
        slot.job, slot.sampler, slot.text = None, None, None
        slot.pending = []
