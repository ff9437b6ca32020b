"""Tool calling as Workers AI does it: tools in, `tool_calls` out, and calls valid by construction.

Two prompt formats. A chat template that knows tools (Llama 3.1's renders them into the conversation and asks
for `{"name": ..., "parameters": {...}}`) gets them handed over as Hugging Face templates expect. A template that
knows nothing of tools (the embedded SmolLM2) gets them described in a system turn of ours, asking for
`{"name": ..., "arguments": {...}}`. Either way the moment the answer opens with `{`, decoding is constrained by a
grammar built from the declared tools' parameter schemas, so every call names a declared tool and its arguments
validate against that tool's schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Grammar
from .engine.grammar import schema_grammar


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Tool:
        """Either shape the schema allows: {name, description, parameters} or {type, function: {...}}."""
        spec = raw["function"] if "function" in raw else raw
        # OpenAI lets a function go without parameters: it then takes none.
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), dict(parameters))

    def as_template_tool(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def payload(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


GENERIC_INSTRUCTIONS = """You can call these tools:
{tools}

To call a tool, answer with only a JSON object of this form and nothing else:
{{"name": "<tool name>", "arguments": {{<the arguments, as the tool's parameters describe>}}}}
Otherwise answer in plain text."""

# The answer becomes a call the moment it opens a JSON object; the grammar takes over from that brace.
CALL_TRIGGER = r"^\s*(\{)[\s\S]*$"
GENERIC_MAX_STRING = 64

# Any answer that does not open with a brace (a small model otherwise imitates the call it sees above).
PLAIN_TEXT = "root ::= [^{ \\t\\r\\n] .*"


def _call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A call from an assistant message: Workers AI's {name, arguments} or OpenAI's {function: {...}}."""
    spec = call.get("function", call)
    arguments = spec.get("arguments", spec.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return spec["name"], arguments


def bounded_strings(schema: Any) -> Any:
    """A copy of a JSON Schema in which every string without a maxLength gets GENERIC_MAX_STRING."""
    if isinstance(schema, list):
        return [bounded_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_strings(value) for key, value in schema.items()}
    if schema.get("type") == "string" and "maxLength" not in schema and "enum" not in schema:
        bounded["maxLength"] = GENERIC_MAX_STRING
    return bounded


class ToolCalling:
    def __init__(self, tools: Sequence[Tool], native: bool, choice: str = "auto") -> None:
        """`native`: the model's chat template renders tools and tool calls itself. `choice`: OpenAI's
        tool_choice: "auto" (the policy above), "required" (a call by construction), "none" (text only), or
        the name of the one tool to call."""
        self.tools = list(tools)
        self.native = native
        self.choice = choice
        self.arguments_key = "parameters" if native else "arguments"

    def prompt_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the chat template should see it."""
        if self.native:
            return [self._native_message(m) for m in messages]
        rendered = [self._generic_message(m) for m in messages]
        tool_list = "\n".join(
            json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}) for t in self.tools
        )
        instructions = GENERIC_INSTRUCTIONS.format(tools=tool_list)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{instructions}"}
        else:
            rendered.insert(0, {"role": "system", "content": instructions})
        return rendered

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.as_template_tool() for tool in self.tools] if self.native else None

    @staticmethod
    def _native_message(message: Mapping[str, Any]) -> dict[str, Any]:
        rendered = dict(message)
        if message.get("tool_calls"):
            rendered["tool_calls"] = [
                {"type": "function", "function": {"name": name, "arguments": arguments}}
                for name, arguments in map(_call_arguments, message["tool_calls"])
            ]
        return rendered

    def _generic_message(self, message: Mapping[str, Any]) -> dict[str, Any]:
        # A template without tool support knows only role and content: calls and results become plain turns.
        if message.get("tool_calls"):
            calls = [{"name": n, "arguments": a} for n, a in map(_call_arguments, message["tool_calls"])]
            text = "\n".join(json.dumps(call) for call in calls)
            return {"role": "assistant", "content": f"{message.get('content') or ''}{text}"}
        if message["role"] in ("tool", "ipython"):
            name = message.get("name")
            prefix = f"Result of {name}: " if name else "Tool result: "
            return {"role": "user", "content": prefix + str(message["content"])}
        return {"role": message["role"], "content": message["content"]}

    def grammar(self, messages: Sequence[Mapping[str, Any]]) -> Grammar | None:
        if self.choice == "none":
            return None
        tools = [t for t in self.tools if t.name == self.choice] or self.tools
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    self.arguments_key: tool.parameters if self.native else bounded_strings(tool.parameters),
                },
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for tool in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"oneOf": calls}
        gbnf = schema_grammar(schema, prop_order=["name", self.arguments_key])
        if self.choice != "auto":
            return Grammar(gbnf)
        if self.native:
            return Grammar(gbnf, lazy_pattern=CALL_TRIGGER)
        if messages and messages[-1]["role"] == "user":
            return Grammar(gbnf)
        return Grammar(PLAIN_TEXT)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Split an answer into its text and its calls."""
        stripped = text.strip()
        if self.choice == "none" or not stripped.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        rest = stripped
        while rest.startswith("{"):
            try:
                obj, end = decoder.raw_decode(rest)
            except json.JSONDecodeError:
                break
            if not isinstance(obj, dict) or obj.get("name") not in {t.name for t in self.tools}:
                break
            arguments = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
            calls.append(ToolCall(obj["name"], arguments if isinstance(arguments, dict) else {}))
            rest = re.sub(r"^[\s;]+", "", rest[end:])
        return (rest if calls else text), calls


class CallStream:
    """A streamed answer: text passes through as it comes, but an answer that opens with `{` may be a call, so it
    is held back and parsed when the answer ends."""

    def __init__(self, tools: ToolCalling | None) -> None:
        self.tools = tools
        self.held = ""

    def feed(self, piece: str) -> str:
        if self.tools is None:
            return piece
        self.held += piece
        if not self.held.strip() or self.held.lstrip().startswith("{"):
            return ""
        text, self.held, self.tools = self.held, "", None  # plain text: no call can follow
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if not held or self.tools is None:
            return held, []
        return self.tools.parse(held)
