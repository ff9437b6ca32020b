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
from .engine import ChatPrompt, CompletionRequest, Grammar, Prompt, TextPrompt
from .errors import BAD_INPUT, ApiError, bad_input
from .json_values import parse_model_json
from .schema_limits import SchemaBudget, SchemaTooCostly, check_schema
from .tools import Tool, ToolCalling

JSON_MODE_UNMET = "JSON Mode couldn't be met"
# JSON mode shows the model the shape it must fill (as llama.cpp's and Ollama's documentation advise): a small
# model held to a grammar it was never told about writes prose into the first string it may. A request whose
# messages already speak of JSON has described the format itself and gets nothing more.
JSON_INSTRUCTION = "Answer with a JSON object that validates against this JSON Schema, and nothing else:\n{schema}"
JSON_OBJECT_INSTRUCTION = "Answer with a JSON object, and nothing else."


@dataclass(frozen=True)
class ModelTraits:
    """What the served model's template and vocabulary decide about a run."""

    native_tools: bool = False  # its chat template renders tools and calls itself
    python_tag: bool = False  # it marks calls with Llama 3.1's <|python_tag|>


def with_json_instruction(messages: list[dict[str, Any]], fmt: dict[str, Any]) -> list[dict[str, Any]]:
    if any("json" in str(m.get("content", "")).lower() for m in messages):
        return messages
    if fmt["type"] == "json_object":
        instruction = JSON_OBJECT_INSTRUCTION
    else:
        instruction = JSON_INSTRUCTION.format(schema=json.dumps(response_schema(fmt), ensure_ascii=False))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def checked_tool_parameters(tools: list[Tool]) -> None:
    """Every tool's parameters within the schema limits (one budget for all) and a JSON Schema, before any of them
    is read: they become the grammar of the calls."""
    budget = SchemaBudget()
    for index, tool in enumerate(tools):
        where = f"'/tools/{index}/parameters'"
        try:
            check_schema(tool.parameters, where, budget, definitions_only=True)
            Draft202012Validator.check_schema(tool.parameters)
        except SchemaTooCostly as exc:
            raise bad_input(f"Error: {exc}") from exc
        except SchemaError as exc:
            # Worded as every schema that cannot become a grammar is: the published input schema admits any
            # object here, so this is a refusal of what the request means, not of its shape.
            raise bad_input(
                f"Error: a tool's parameters cannot be enforced: {where} is not a JSON Schema: {exc.message}"
            ) from exc


@dataclass(frozen=True)
class RunPlan:
    prompt: Prompt
    grammar: Grammar | None = None
    tools: ToolCalling | None = None
    json_schema: dict[str, Any] | None = None

    @classmethod
    def build(cls, run: RunRequest, traits: ModelTraits, tool_choice: str = "auto") -> RunPlan:
        if run.messages is None:
            assert run.prompt is not None
            if run.raw:
                return cls.with_json_mode(TextPrompt(run.prompt), run)
            return cls.with_json_mode(ChatPrompt([{"role": "user", "content": run.prompt}]), run)
        if run.tools:
            tools = [Tool.from_request(t) for t in run.tools]
            checked_tool_parameters(tools)
            calling = ToolCalling(tools, native=traits.native_tools, choice=tool_choice, python_tag=traits.python_tag)
            try:
                messages = calling.prompt_messages(run.messages)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # An earlier turn's tool call whose arguments are not a JSON object, or that names no function.
                raise bad_input(f"Error: '/messages': a tool call in the conversation is malformed ({exc!r})") from exc
            prompt = ChatPrompt(messages, calling.template_tools())
            return cls(prompt, calling.grammar(run.messages), tools=calling)
        return cls.with_json_mode(ChatPrompt(run.messages), run)

    @classmethod
    def with_json_mode(cls, prompt: Prompt, run: RunRequest) -> RunPlan:
        fmt = run.response_format
        if fmt is None:
            return cls(prompt)
        schema = response_schema(fmt)
        try:
            check_schema(schema, "'/response_format/json_schema'")
        except SchemaTooCostly as exc:
            raise bad_input(f"Error: {exc}") from exc
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise bad_input(f"Error: '/response_format/json_schema' is not a JSON Schema: {exc.message}") from exc
        if isinstance(prompt, ChatPrompt):
            prompt = ChatPrompt(with_json_instruction(list(prompt.messages), fmt), prompt.tools)
        return cls(prompt, Grammar.json_document(schema), json_schema=schema)

    def completion(
        self, run: RunRequest, session: str | None, adapter: Path | None = None, cache_scope: str | None = None
    ) -> CompletionRequest:
        return CompletionRequest(
            self.prompt,
            run.sampling,
            run.max_tokens,
            session=session,
            grammar=self.grammar,
            adapter=adapter,
            cache_scope=cache_scope,
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
            value = parse_model_json(text)
        except json.JSONDecodeError as exc:
            # The engine closes every document within the budget; only a cancelled generation ends early.
            message = f"{JSON_MODE_UNMET}: the answer ended early ({exc}); raise max_tokens"
            raise ApiError(400, BAD_INPUT, message) from exc
        errors = [e.message for e in Draft202012Validator(self.json_schema).iter_errors(value)]
        if errors:
            raise ApiError(400, BAD_INPUT, f"{JSON_MODE_UNMET}: {'; '.join(errors)}")
        return value
