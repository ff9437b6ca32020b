"""The one run path every API surface translates onto: a validated run request becomes a plan, the plan becomes an
engine request, and the engine's text becomes an answer with Workers AI's result shapes.

Surfaces (Workers AI REST, the Worker binding, OpenAI) differ only in how they read a request and frame an
answer; validation, refusals and their error codes, tool calls, JSON mode, stop sequences, usage and finish
reasons are decided here, once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .adapters import AdapterError, AdapterStore
from .contract import InputContract, RunRequest
from .engine import (
    BudgetTooSmall,
    Busy,
    ChatTemplateError,
    Engine,
    EngineNotReady,
    FinishReason,
    Generation,
    GrammarError,
    PromptEmpty,
    PromptTooLarge,
    PromptTooLong,
    QueueFull,
    Usage,
)
from .errors import INVALID_MODEL_ID, NO_SUCH_MODEL, OUT_OF_CAPACITY, ApiError, bad_input
from .run_options import DEFAULT_OPTIONS, RunOptions
from .run_plan import ModelTraits, RunPlan
from .stops import StopScanner
from .strict import refuse_extensions
from .tools import CallStream, ToolCall

log = logging.getLogger("workers_ai_local.text_generation")
CAPACITY_EXCEEDED = "Capacity temporarily exceeded, please try again."


def usage_payload(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Answer:
    """One running generation as a surface consumes it: whole (`text` then `result`) or streamed (`stream`, then
    `calls`), with `usage` and `finish_reason` once it is over."""

    def __init__(self, plan: RunPlan, generation: Generation, stops: Sequence[str] = ()) -> None:
        self.plan = plan
        self.generation = generation
        self.scanner = StopScanner(stops)
        self.calls: list[ToolCall] = []

    @property
    def usage(self) -> dict[str, object]:
        return usage_payload(self.generation.usage)

    @property
    def finish_reason(self) -> str:
        """OpenAI's vocabulary, which Workers AI's own usage follows: tool_calls, stop or length."""
        if self.calls:
            return "tool_calls"
        if self.scanner.stopped or self.generation.finish_reason is not FinishReason.LENGTH:
            return "stop"
        return "length"

    async def pieces(self) -> AsyncIterator[str]:
        """Generated text cut at the first stop sequence; the generation is cancelled there."""
        async for piece in self.generation:
            text = self.scanner.feed(piece)
            if text:
                yield text
            if self.scanner.stopped:
                self.generation.cancel()
                return
        tail = self.scanner.flush()
        if tail:
            yield tail

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def result(self, text: str) -> dict[str, Any]:
        """`response` and `tool_calls` of the finished text; raises ApiError when JSON mode was not met."""
        result = self.plan.result(text)
        self.calls = [ToolCall(c["name"], c["arguments"]) for c in result["tool_calls"]]
        return result

    async def stream(self) -> AsyncIterator[str]:
        """Text as it may be shown: an answer that could be a tool call is held back and parsed at the end, after
        which `calls` holds the calls it made."""
        answer = CallStream(self.plan.tools)
        async for piece in self.pieces():
            text = answer.feed(piece)
            if text:
                yield text
        text, self.calls = answer.finish()
        if text:
            yield text

    def close(self) -> None:
        """Stop generating (a no-op once finished): called when a surface is done with the answer, whatever ended it."""
        self.generation.cancel()


class TextGeneration:
    def __init__(
        self, engine: Engine, contracts: Mapping[str, InputContract], adapters: AdapterStore, strict: bool = False
    ) -> None:
        """`strict`: refuse what the hosted model refuses (see strict.py)."""
        self.engine = engine
        self.contracts = dict(contracts)
        self.adapters = adapters
        self.strict = strict

    @property
    def models(self) -> list[str]:
        return sorted(self.contracts)

    @property
    def traits(self) -> ModelTraits:
        return ModelTraits(native_tools=self.engine.native_tools, python_tag=self.engine.python_tag)

    def parse(self, model: str, body: object) -> RunRequest:
        """A run request for `model` from a body in the model's published input schema."""
        contract = self.contracts.get(model)
        if contract is None:
            raise ApiError(400, NO_SUCH_MODEL, f"No such model {model} or task")
        self.refuse_long_conversation(body)
        return contract.parse(body)

    def refuse_long_conversation(self, body: object) -> None:
        """A conversation over the engine's message limit, refused before schema validation walks every message
        (100,000 messages took seconds each on the event loop); the engine checks the same limit again."""
        messages = body.get("messages") if isinstance(body, dict) else None
        limit = self.engine.max_messages
        if limit and isinstance(messages, list) and len(messages) > limit:
            raise bad_input(
                f"Error: the prompt has {len(messages)} messages, over the limit of {limit}; shorten the input"
            )

    async def start(
        self,
        run: RunRequest,
        session: str | None = None,
        tool_choice: str = "auto",
        stops: Sequence[str] = (),
        options: RunOptions = DEFAULT_OPTIONS,
        cache_scope: str | None = None,
    ) -> Answer:
        """Queue a run. Refusals (bad grammar or template, too long a prompt, a full queue, a model still loading,
        an unknown adapter, a busy server under rejectIfBusy) raise ApiError in Workers AI's codes before anything
        is generated. `cache_scope`: whose cached prompts the run may reuse (see auth.cache_scope)."""
        if self.strict:
            refuse_extensions(run)
        adapter = self.adapter_path(run.lora) if run.lora is not None else None
        plan = RunPlan.build(run, self.traits, tool_choice=tool_choice)
        constrained = "'/response_format/json_schema'" if plan.json_schema is not None else "a tool's parameters"
        try:
            generation = await self.engine.submit(
                plan.completion(run, session, adapter, cache_scope), options.reject_if_busy
            )
        except GrammarError as exc:
            raise bad_input(f"Error: {constrained} cannot be enforced: {exc}") from exc
        except BudgetTooSmall as exc:
            raise bad_input(f"Error: {exc}; raise max_tokens to at least {exc.needed}") from exc
        except ChatTemplateError as exc:
            raise bad_input(f"Error: {exc}") from exc
        except (PromptTooLong, PromptTooLarge) as exc:
            raise bad_input(f"Error: {exc}; shorten the input") from exc
        except Busy as exc:
            log.info("rejected at once (rejectIfBusy): %s", exc)
            raise ApiError(429, OUT_OF_CAPACITY, CAPACITY_EXCEEDED) from exc
        except PromptEmpty as exc:
            raise bad_input(f"Error: {exc}") from exc
        except QueueFull as exc:
            raise ApiError(429, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc
        except EngineNotReady as exc:
            raise ApiError(503, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc
        return Answer(plan, generation, stops)

    async def prompt(self, run: RunRequest, tool_choice: str = "auto") -> tuple[str, list[int]]:
        """The text and the tokens a run would feed the model, without running it."""
        plan = RunPlan.build(run, self.traits, tool_choice=tool_choice)
        try:
            tokens = await self.engine.tokenize(plan.prompt)  # size limits first, then the text (rendered again)
            return self.engine.prompt_text(plan.prompt), tokens
        except ChatTemplateError as exc:
            raise bad_input(f"Error: {exc}") from exc
        except (PromptTooLong, PromptTooLarge) as exc:
            raise bad_input(f"Error: {exc}; shorten the input") from exc
        except PromptEmpty as exc:
            raise bad_input(f"Error: {exc}") from exc
        except QueueFull as exc:
            raise ApiError(429, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc
        except EngineNotReady as exc:
            raise ApiError(503, OUT_OF_CAPACITY, f"{CAPACITY_EXCEEDED} ({exc})") from exc

    def adapter_path(self, name: str) -> Path:
        try:
            path = self.adapters.resolve(name)
        except AdapterError as exc:
            raise ApiError(exc.status, exc.code, str(exc)) from exc
        if path is None:
            raise ApiError(404, INVALID_MODEL_ID, f"Invalid model id: no LoRA adapter or fine-tune named {name!r}")
        return path
