"""What an answer must look like, as llguidance grammars: one JSON document for JSON mode; text or tool calls for
tools. A grammar also names the JSON Schema of the documents in it, whose completion within the token budget the
engine guarantees (see completion.py and structured.py).

JSON is laid out one way ("a, b" and "k: v", no other whitespace): the grammar then forces every separator, the
answer costs the fewest tokens, and its shortest ending can be computed exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .completion import Layout

LAYOUT = Layout(item=b", ", key=b": ")
# Text that is not a call, for a model told of tools in a system turn of ours: it may not open with a brace (or
# whitespace before one), which would start a call; a small model otherwise imitates the calls it was shown.
TEXT_TERMINAL = r"TEXT: /[^{\s][\s\S]*/"
# Text beside calls for a model whose own template renders the tools: anything it would write without a grammar
# but a call, which opens with a brace (after any whitespace) or <|python_tag|>. Whitespace alone is text too.
FREE_TEXT_TERMINAL = r"TEXT: /\s*[^{\s][\s\S]*|\s+/"
LEADING_SPACE_TERMINAL = r"LEAD: /\s+/"
# Llama 3.1 marks a call it means to run with <|python_tag|>, and several calls are written one after another
# separated by "; " (the separator its function-calling parsers split on).
PYTHON_TAG = "<|python_tag|>"
CALL_SEPARATOR = "; "


class GrammarError(Exception):
    """A schema or grammar that cannot constrain decoding: the message says which keyword or construct."""


@dataclass(frozen=True)
class Grammar:
    lark: str  # llguidance's Lark dialect
    document: dict[str, Any] | None = None  # the schema every JSON document of the answer validates against
    whole_answer: bool = False  # the answer is exactly one document (JSON mode), not text or calls
    text_allowed: bool = False  # the answer may be text instead of documents (then it may also be empty)

    @classmethod
    def json_document(cls, schema: dict[str, Any]) -> Grammar:
        """The answer is one JSON document that validates against `schema`."""
        return cls(f"start: {_embedded(schema)}", document=schema, whole_answer=True)

    @classmethod
    def tool_calls(
        cls, call: dict[str, Any], text_allowed: bool, several: bool, python_tag: bool, free_text: bool = False
    ) -> Grammar:
        """Tool calls validating against `call` (one schema for all the declared tools), or else text when
        `text_allowed`: with `free_text`, any text that does not open a call (whitespace may precede a call);
        otherwise text that does not open with a brace or whitespace. `several` calls separated as Llama 3.1
        writes them."""
        calls = "call" + (f' ("{CALL_SEPARATOR}" call)*' if several else "")
        if not text_allowed:
            start = "start: calls"
        elif free_text:
            start = "start: TEXT? | LEAD? calls"
        else:
            start = "start: TEXT? | calls"
        rules = [
            start,
            f"calls: {PYTHON_TAG}? {calls}" if python_tag else f"calls: {calls}",
            f"call: {_embedded(call)}",
        ]
        if text_allowed:
            rules += [FREE_TEXT_TERMINAL, LEADING_SPACE_TERMINAL] if free_text else [TEXT_TERMINAL]
        return cls("\n".join(rules), document=call, text_allowed=text_allowed)

    @classmethod
    def plain_text(cls) -> Grammar:
        """Text only, and not opening with a brace (a small model otherwise imitates the calls it was shown)."""
        return cls(f"start: TEXT?\n{TEXT_TERMINAL}", text_allowed=True)


def _embedded(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": LAYOUT.options()}, ensure_ascii=False)
