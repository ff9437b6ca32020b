"""From a validated run request to what the engine is asked, and from the engine's text to Workers AI's result.

This is where prompt mode, raw mode, messages, tools and JSON mode become a prompt and a grammar, and where
the generated text becomes `response` (a string, or the parsed object in JSON mode) and `tool_calls`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from .contract import RunRequest, response_schema
from .engine import ChatPrompt, CompletionRequest, Grammar, GrammarError, Prompt, TextPrompt, schema_grammar
from .errors import BAD_INPUT, ApiError, bad_input
from .tools import Tool, ToolCalling

JSON_MODE_UNMET = "JSON Mode couldn't be met"


@dataclass(frozen=True)
class RunPlan:
    prompt: Prompt
    grammar: Grammar | None = None
    tools: ToolCalling | None = None
    json_schema: dict[str, Any] | None = None

    @classmethod
    def build(cls, run: RunRequest, native_tools: bool, tool_choice: str = "auto") -> RunPlan:
        if run.messages is None:
            assert run.prompt is not None
            if run.raw:
                return cls.with_json_mode(TextPrompt(run.prompt), run)
            return cls.with_json_mode(ChatPrompt([{"role": "user", "content": run.prompt}]), run)
        if run.tools:
            calling = ToolCalling([Tool.from_request(t) for t in run.tools], native=native_tools, choice=tool_choice)
            try:
                grammar = calling.grammar(run.messages)
            except GrammarError as exc:
                raise bad_input(f"Error: a tool's parameters: {exc}") from exc
            try:
                messages = calling.prompt_messages(run.messages)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # An earlier turn's tool call whose arguments are not a JSON object, or that names no function.
                raise bad_input(f"Error: '/messages': a tool call in the conversation is malformed ({exc!r})") from exc
            prompt = ChatPrompt(messages, calling.template_tools())
            return cls(prompt, grammar, tools=calling)
        return cls.with_json_mode(ChatPrompt(run.messages), run)

    @classmethod
    def with_json_mode(cls, prompt: Prompt, run: RunRequest) -> RunPlan:
        if run.response_format is None:
            return cls(prompt)
        schema = response_schema(run.response_format)
        try:
            Draft202012Validator.check_schema(schema)
            grammar = Grammar(schema_grammar(schema))
        except (SchemaError, GrammarError) as exc:
            raise bad_input(f"Error: '/response_format/json_schema' cannot be used: {exc}") from exc
        return cls(prompt, grammar, json_schema=schema)

    def completion(self, run: RunRequest, session: str | None, adapter: Path | None = None) -> CompletionRequest:
        return CompletionRequest(
            self.prompt, run.sampling, run.max_tokens, session=session, grammar=self.grammar, adapter=adapter
        )

    def result(self, text: str) -> dict[str, Any]:
        """`response` and `tool_calls` of a finished answer (usage is the caller's)."""
        if self.json_schema is not None:
            return {"response": self.parse_json(text), "tool_calls": []}
        if self.tools is not None:
            rest, calls = self.tools.parse(text)
            return {"response": rest, "tool_calls": [call.payload() for call in calls]}
        return {"response": text, "tool_calls": []}

    def parse_json(self, text: str) -> Any:
        assert self.json_schema is not None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            # The grammar only allows valid JSON, so this is an answer cut short by max_tokens.
            message = f"{JSON_MODE_UNMET}: the answer ended early ({exc}); raise max_tokens"
            raise ApiError(400, BAD_INPUT, message) from exc
        errors = [e.message for e in Draft202012Validator(self.json_schema).iter_errors(value)]
        if errors:
            raise ApiError(400, BAD_INPUT, f"{JSON_MODE_UNMET}: {'; '.join(errors)}")
        return value
