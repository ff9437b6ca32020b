"""Grammars that constrain decoding: GBNF text for llama.cpp's grammar sampler, built from JSON Schemas."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf


class GrammarError(Exception):
    """A schema the converter cannot turn into a grammar, or a grammar llama.cpp cannot parse."""


@dataclass(frozen=True)
class Grammar:
    gbnf: str
    # With a pattern the grammar waits until the output matches it (from the start), then constrains from the
    # pattern's first group on; without one it constrains from the first token.
    lazy_pattern: str | None = None


# llama-cpp-python's converter lets raw control characters into JSON strings, which JSON forbids (and a small
# model sampling hot does emit them); its string character rule is replaced by one that excludes them.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def schema_grammar(schema: dict[str, Any], prop_order: Sequence[str] = ()) -> str:
    """GBNF for JSON documents that validate against `schema`."""
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema), prop_order=list(prop_order))
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as exc:
        raise GrammarError(f"the JSON Schema cannot be turned into a grammar: {exc!r}") from exc
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)
