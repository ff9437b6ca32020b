"""Tool calling as Workers AI does it: tools in, `tool_calls` out, and calls valid by construction.

Two prompt formats. A chat template that knows tools (Llama 3.1's renders them into the conversation and asks
for `{"name": ..., "parameters": {...}}`) gets them handed over as Hugging Face templates expect. A template that
knows nothing of tools (the embedded SmolLM2) gets them described in a system turn of ours, asking for
`{"name": ..., "arguments": {...}}`. Either way decoding follows a grammar built from the declared tools' parameter
schemas: an answer that opens with `{` (or Llama 3.1's `<|python_tag|>`) is calls, each naming a declared tool with
arguments that validate against its schema, and a call is always completed within the token budget.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import Grammar
from .json_values import finite_or_null


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_request(cls, raw: Mapping[str, Any]) -> Tool:
        """Either shape the schema allows: {name, description, parameters} or {type, function: {...}}."""
        # The flat shape is the one the schema's first alternative requires `name` of; a flat tool may still carry
        # an unrelated "function" key, so the shape is told by `name`, not by the presence of "function".
        spec = raw if "name" in raw else raw["function"]
        # OpenAI lets a function go without parameters: it then takes none.
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        return cls(spec["name"], spec.get("description", ""), dict(parameters))

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """What a call's arguments must be: the parameters, closed to undeclared arguments unless they say
        otherwise (JSON Schema would allow them, and no function expects a model's inventions)."""
        return {"additionalProperties": False, **self.parameters}

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


DEFINITIONS = ("$defs", "definitions")


def _with_refs_renamed(schema: Any, renames: Mapping[str, str]) -> Any:
    if isinstance(schema, list):
        return [_with_refs_renamed(item, renames) for item in schema]
    if not isinstance(schema, dict):
        return schema
    renamed = {key: _with_refs_renamed(value, renames) for key, value in schema.items()}
    if isinstance(schema.get("$ref"), str) and schema["$ref"] in renames:
        renamed["$ref"] = renames[schema["$ref"]]
    return renamed


def hoisted_definitions(index: int, parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A tool's parameters without their `$defs`, and those definitions renamed for the call's root: a `$ref`
    points from the root of the schema it is in, which is the call wrapper once parameters are embedded there."""
    definitions: dict[str, Any] = {}
    renames: dict[str, str] = {}
    for keyword in DEFINITIONS:
        for name, definition in (parameters.get(keyword) or {}).items():
            unique = f"tool{index}_{name}"
            definitions[unique] = definition
            renames[f"#/{keyword}/{name}"] = f"#/$defs/{unique}"
    if not definitions:
        return parameters, {}
    stripped = {k: v for k, v in parameters.items() if k not in DEFINITIONS}
    return _with_refs_renamed(stripped, renames), _with_refs_renamed(definitions, renames)


def _call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A call from an assistant message: Workers AI's {name, arguments} or OpenAI's {function: {...}}."""
    spec = call.get("function", call)
    arguments = spec.get("arguments", spec.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    return spec["name"], arguments


class ToolCalling:
    def __init__(self, tools: Sequence[Tool], native: bool, choice: str = "auto", python_tag: bool = False) -> None:
        """`native`: the model's chat template renders tools and tool calls itself. `choice`: OpenAI's
        tool_choice: "auto" (the policy above), "required" (a call by construction), "none" (text only), or
        the name of the one tool to call. `python_tag`: the model may mark calls with Llama 3.1's tag."""
        self.tools = list(tools)
        self.native = native
        self.choice = choice
        self.python_tag = python_tag
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
        calls, definitions = [], {}
        for index, tool in enumerate(tools):
            parameters, own = hoisted_definitions(index, tool.arguments_schema)
            definitions.update(own)
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, self.arguments_key: parameters},
                    "required": ["name", self.arguments_key],
                    "additionalProperties": False,
                }
            )
        call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if definitions:
            call = {**call, "$defs": definitions}
        if self.native:
            # Llama 3.1 decides between text and calls itself (unless told to call), and may make several.
            # Its text is left as free as it is without tools: only an answer that opens a call is held to them.
            text = self.choice == "auto"
            return Grammar.tool_calls(call, text_allowed=text, several=True, python_tag=self.python_tag, free_text=True)
        if self.choice != "auto" or (messages and messages[-1]["role"] == "user"):
            return Grammar.tool_calls(call, text_allowed=False, several=False, python_tag=False)
        return Grammar.plain_text()

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Split an answer into its text and its calls."""
        stripped = text.strip()
        if self.choice == "none" or not stripped.startswith("{"):
            return text, []
        decoder = json.JSONDecoder(parse_float=finite_or_null)
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
