"""The shortest way to finish a JSON document from wherever generation stands, so an answer can always be completed
within its token budget.

Three parts work together:
- `Schemas.min_value`: the shortest valid JSON text for a schema node, once per node. Objects and arrays are
  assembled (required properties in the grammar's order with their shortest values, `minItems` shortest items);
  every other node (strings with pattern, format or length bounds, bounded numbers, enum, const) comes from a
  small shortest-path search over the node's own grammar, byte by byte.
- `Tracker`: an incremental JSON parser over the bytes generated so far, keeping the open objects and arrays
  with their candidate schemas, keys written and item counts. From it, the structural ending: close the open
  containers innermost first, adding the missing required properties and `minItems` items.
- The lexeme in progress (a string or key mid-way, a number mid-digit, a literal) is finished by the same byte
  search, run on a copy of a byte-level twin of the answer's grammar ("shadow"), stopping as soon as the lexeme
  may end; escapes, partial UTF-8, patterns, formats and bounds all come from the grammar itself.

Every candidate ending is validated against the shadow before it is returned, shortest first; the search is
for fewest bytes, and the caller counts the tokens of the ending it will actually force.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import llguidance as llg
import numpy as np

WHITESPACE = b" \t\r\n"
COMMA, COLON, QUOTE, BACKSLASH = 0x2C, 0x3A, 0x22, 0x5C
OPEN_OBJECT, CLOSE_OBJECT, OPEN_ARRAY, CLOSE_ARRAY = 0x7B, 0x7D, 0x5B, 0x5D
# Bytes a string search tries as they are (they may matter to a pattern or format); other bytes are tried one
# per class, since any letter serves where a letter is wanted.
_STRING_PUNCTUATION = set(b"@.-_:/+ ,")
# "1" and "0" first: the shortest valid numbers and dates are made of them.
_BYTE_ORDER = [0x31, 0x30] + [b for b in range(256) if b not in (0x30, 0x31)]


# What one schema's shortest-answer computation may spend: the bytes of any shortest value it assembles (an answer
# that long could not fit any context window), and the grammar states its byte searches visit in all. Requests'
# schemas are held to smaller limits before they get here (server/schema_limits.py); these bound what those
# limits still allow together (nested `minItems`, many searched leaves).
MAX_SHORTEST_BYTES = 1 << 20
MAX_SEARCH_NODES = 200_000
# `$ref`s followed in a row before the chain is taken for a cycle.
MAX_REF_CHAIN = 32


class SchemaTooCostly(Exception):
    """The shortest answer of a schema is longer, or costlier to find, than the limits above."""


class Withdrawn(Exception):
    """Work stopped because whoever asked for it stopped waiting (or the server is stopping)."""


class PointerError(ValueError):
    """A `$ref` that is not a JSON Pointer into its own schema, or that points at nothing there."""


def resolve_pointer(root: Any, ref: str) -> Any:
    """The subschema `ref` names in `root`: `#`, or `#/a/b/0` with percent-escapes and `~0`/`~1` decoded."""
    if ref != "#" and not ref.startswith("#/"):
        raise PointerError("only JSON Pointers into this schema ('#/$defs/name') can be followed")
    target = root
    for raw in unquote(ref[1:]).split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise PointerError(f"nothing at {part!r}")
    if not isinstance(target, dict | bool):
        raise PointerError("it points at a value that is not a schema")
    return target


BYTE_EOS = 256  # the byte tokenizer's end of text: it validates only where the document may end


class _Bytes:
    """A 257-token tokenizer (each byte, and EOS) so that a grammar can be walked one byte at a time."""

    def __init__(self) -> None:
        self.eos_token_id = BYTE_EOS
        self.bos_token_id = None
        self.tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
        self.special_token_ids = [BYTE_EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


BYTE_TOKENIZER = llg.LLTokenizer(llg.TokenizerWrapper(_Bytes()))


def completes(matcher: llg.LLMatcher, data: bytes) -> bool:
    """`data` is valid from the matcher's state and leaves the document complete; the matcher is left as it is."""
    if matcher.is_stopped() or matcher.is_error():  # no token validates there, not even after nothing
        check = matcher.deep_copy()
        return check.consume_tokens(list(data)) and check.is_accepting()
    # EOS validates exactly where the document may end. Validating leaves the matcher be, and costs several times
    # less than consuming the same bytes on a copy.
    return matcher.validate_tokens([*data, BYTE_EOS]) == len(data) + 1


def _allowed_bytes(matcher: llg.LLMatcher) -> list[int]:
    mask = np.frombuffer(bytes(matcher.compute_bitmask()), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(mask, bitorder="little")[:256]).tolist()


def _candidates(allowed: list[int], in_string: bool) -> list[int]:
    present = set(allowed)
    ordered = [b for b in _BYTE_ORDER if b in present]
    if not in_string:
        return [b for b in ordered if b not in WHITESPACE] or ordered[:1]
    if len(ordered) <= 16:  # a pattern, format or enum is steering: every byte may matter
        return ordered
    # The closing quote first: most strings may simply end here.
    chosen, classes = [QUOTE] if QUOTE in present else [], set()
    for b in ordered:
        if b == QUOTE:
            continue
        if b == BACKSLASH or b in _STRING_PUNCTUATION:
            chosen.append(b)
            continue
        kind = "a" if 97 <= b <= 122 else "A" if 65 <= b <= 90 else "0" if 48 <= b <= 57 else "u" if b >= 0x80 else "."
        if kind not in classes:
            classes.add(kind)
            chosen.append(b)
    return [b for b in chosen if b < 0x80] or chosen


Done = Callable[[llg.LLMatcher, bool], bool]


@dataclass
class SearchBudget:
    """Steps (grammar states searched, items assembled) one schema's shortest answers may still take (see
    MAX_SEARCH_NODES), and whether their caller still waits for them."""

    nodes: int = MAX_SEARCH_NODES
    gone: Callable[[], bool] = lambda: False

    def spend(self) -> None:
        self.nodes -= 1
        if self.nodes < 0:
            raise SchemaTooCostly(f"finding the schema's shortest answer takes more than {MAX_SEARCH_NODES} steps")
        if self.gone():
            raise Withdrawn("the request was withdrawn while its shortest answer was computed")


def shortest_bytes(
    matcher: llg.LLMatcher,
    in_string: bool,
    escape: bool,
    done: Done,
    max_nodes: int = 4000,
    budget: SearchBudget | None = None,
) -> bytes | None:
    """The fewest bytes after which `done(matcher, in_string)` holds: breadth first, each state checked as it is
    reached, states that look alike at the same depth merged, forced bytes taken whole. None if none is found
    within `max_nodes`; SchemaTooCostly once `budget` is spent."""
    if done(matcher, in_string):
        return b""
    frontier = [(matcher, in_string, escape, b"")]
    nodes = 0
    while frontier:
        following, seen = [], set()
        for state, string, escaped, path in frontier:
            forced = _within_lexeme(state.compute_ff_bytes(), string, escaped)
            edges = [forced] if forced else [bytes([b]) for b in _candidates(_allowed_bytes(state), string)]
            for edge in edges:
                nodes += 1
                if nodes > max_nodes:
                    return None
                if budget is not None:
                    budget.spend()
                after = state.deep_copy()
                if not after.consume_tokens(list(edge)):
                    continue
                string_after, escaped_after = _scan_string(edge, string, escaped)
                if done(after, string_after):
                    return path + edge
                key = (bytes(after.compute_bitmask()), after.is_accepting(), string_after, escaped_after)
                if key in seen:
                    continue
                seen.add(key)
                following.append((after, string_after, escaped_after, path + edge))
        frontier = following
    return None


def _after_byte(b: int, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """Whether we are inside a JSON string, and just after a backslash in it, once byte `b` is read."""
    if not in_string:
        return b == QUOTE, False
    if escaped:
        return True, False
    return b != QUOTE, b == BACKSLASH


def _within_lexeme(forced: bytes, in_string: bool, escaped: bool) -> bytes:
    """The part of forced bytes that belongs to the lexeme under way: up to a string's closing quote, or up to a
    separator or closer after a number or literal. (The grammar may force far beyond, through the next key.)"""
    for i, b in enumerate(forced):
        if in_string:
            in_string, escaped = _after_byte(b, in_string, escaped)
            if not in_string:
                return forced[: i + 1]
        elif b in (COMMA, CLOSE_OBJECT, CLOSE_ARRAY):
            return forced[: max(i, 1)]
    return forced


def _scan_string(data: bytes, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """Whether we are inside a JSON string (and just after a backslash) once `data` is read."""
    for b in data:
        in_string, escaped = _after_byte(b, in_string, escaped)
    return in_string, escaped


def _value_may_end(matcher: llg.LLMatcher, in_string: bool) -> bool:
    """A value may end here: the document is complete, or a separator or closer may follow."""
    if in_string:
        return False
    # Three one-byte checks: computing and unpacking the byte mask for them cost several times more.
    return matcher.is_accepting() or any(matcher.validate_tokens([b]) for b in (COMMA, CLOSE_OBJECT, CLOSE_ARRAY))


def _key_ended(_matcher: llg.LLMatcher, in_string: bool) -> bool:
    return not in_string


@dataclass(frozen=True)
class Layout:
    """The separators the answer's grammar allows (JSON options: no free whitespace)."""

    item: bytes = b", "
    key: bytes = b": "

    def options(self) -> dict[str, Any]:
        return {"whitespace_flexible": False, "item_separator": self.item.decode(), "key_separator": self.key.decode()}


class Schemas:
    """A JSON Schema's nodes, with their shortest valid values."""

    def __init__(self, root: dict[str, Any], layout: Layout, budget: SearchBudget | None = None) -> None:
        self.root = root
        self.layout = layout
        # Resolved once per schema node, each kept with the node it came from: the alternatives a merge builds then
        # stay alive and the same objects, so the shortest values can be keyed by their identity.
        self._resolved: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
        self._shortest: dict[int, bytes | None] = {}
        self._busy: set[int] = set()
        self._resolving: set[int] = set()
        self.budget = budget or SearchBudget()

    def resolve(self, schema: Any) -> list[dict[str, Any]]:
        """A schema as the alternatives it allows: $ref followed, anyOf/oneOf flattened, a list of types split.
        The list is shared between calls: read it, do not change it."""
        known = self._resolved.get(id(schema))  # a node in the cache is alive, so no other object has its id
        if known is not None:
            return known[1]
        if id(schema) in self._resolving:
            return []  # an alternative of itself (a self-referencing anyOf) adds no alternative
        self._resolving.add(id(schema))
        try:
            alternatives = self._resolve(schema)
        finally:
            self._resolving.discard(id(schema))
        self._resolved[id(schema)] = (schema, alternatives)
        return alternatives

    def _resolve(self, schema: Any) -> list[dict[str, Any]]:
        if schema is True or schema is None:
            return [{}]
        if schema is False or not isinstance(schema, dict):
            return []
        for _ in range(MAX_REF_CHAIN):  # a $ref chain longer than this is a cycle
            if "$ref" not in schema:
                break
            try:
                target = resolve_pointer(self.root, schema["$ref"])
            except PointerError:
                return []  # refused before a request gets here (schema_limits); nothing to offer if not
            if target is False:
                return []
            target = {} if target is True else target
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if rest else target
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                base = {k: v for k, v in schema.items() if k != keyword}
                return [{**base, **r} if base else r for branch in schema[keyword] for r in self.resolve(branch)]
        if isinstance(schema.get("type"), list):
            return [{**schema, "type": kind} for kind in schema["type"]]
        return [schema]

    @staticmethod
    def kind(schema: dict[str, Any]) -> str:
        declared = schema.get("type")
        if declared in ("object", "array"):
            return declared
        if declared is None and "enum" not in schema and "const" not in schema:
            if "properties" in schema or "required" in schema:
                return "object"
            if "items" in schema or "prefixItems" in schema:
                return "array"
        return "leaf"

    @staticmethod
    def property_order(schema: dict[str, Any]) -> list[str]:
        listed = list(schema.get("properties", {}))
        return listed + [k for k in schema.get("required", []) if k not in listed]

    @staticmethod
    def property_schema(schema: dict[str, Any], key: str) -> Any:
        return schema.get("properties", {}).get(key, schema.get("additionalProperties", True))

    @staticmethod
    def item_schema(schema: dict[str, Any], index: int) -> Any:
        prefix = schema.get("prefixItems", [])
        return prefix[index] if index < len(prefix) else schema.get("items", True)

    def shortest(self, schema: Any) -> bytes | None:
        """The shortest valid text for a schema; None when there is none to be found (a recursion with no exit)."""
        best = None
        for alternative in self.resolve(schema):
            key = id(alternative)
            if key not in self._shortest:
                if key in self._busy:
                    continue
                self._busy.add(key)
                self._shortest[key] = self._shortest_of(alternative)
                self._busy.discard(key)
            value = self._shortest[key]
            if value is not None and (best is None or len(value) < len(best)):
                best = value
        return best

    def _shortest_of(self, schema: dict[str, Any]) -> bytes | None:
        kind = self.kind(schema)
        if kind == "object" and not any(k in schema for k in ("allOf", "minProperties", "patternProperties")):
            members, size = [], 0
            for name in self.property_order(schema):
                if name in schema.get("required", []):
                    value = self.shortest(self.property_schema(schema, name))
                    if value is None:
                        return None
                    members.append(json.dumps(name).encode() + self.layout.key + value)
                    self.budget.spend()
                    size += len(members[-1]) + len(self.layout.item)
                    if size > MAX_SHORTEST_BYTES:
                        raise SchemaTooCostly(f"the schema's shortest answer is longer than {MAX_SHORTEST_BYTES} bytes")
            return b"{" + self.layout.item.join(members) + b"}"
        if kind == "array" and "contains" not in schema:
            items, size = [], 0
            for index in range(schema.get("minItems", 0)):
                value = self.shortest(self.item_schema(schema, index))
                if value is None:
                    return None
                items.append(value)
                self.budget.spend()
                size += len(value) + len(self.layout.item)
                if size > MAX_SHORTEST_BYTES:
                    raise SchemaTooCostly(f"the schema's shortest answer is longer than {MAX_SHORTEST_BYTES} bytes")
            return b"[" + self.layout.item.join(items) + b"]"
        # Anything else: search the node's own grammar, with the document's definitions and options.
        node = dict(schema)
        for definitions in ("$defs", "definitions"):
            if definitions in self.root and definitions not in node:
                node[definitions] = self.root[definitions]
        node["x-guidance"] = self.layout.options()
        matcher = llg.LLMatcher(BYTE_TOKENIZER, llg.grammar_from("json_schema", json.dumps(node)), log_level=0)
        if matcher.is_error():
            return None
        done = lambda m, _: m.is_accepting()  # noqa: E731
        return shortest_bytes(matcher, False, False, done, max_nodes=20000, budget=self.budget)


@dataclass
class Frame:
    """An open object or array."""

    kind: str  # "object" or "array"
    alternatives: list[dict[str, Any]]
    state: str = "start"  # object: start, key, colon, value, after; array: start, value, after
    keys: list[str] = field(default_factory=list)
    key_bytes: bytearray = field(default_factory=bytearray)
    count: int = 0

    def copy(self) -> Frame:
        return Frame(self.kind, self.alternatives, self.state, list(self.keys), bytearray(self.key_bytes), self.count)


class Tracker:
    """An incremental JSON parser over bytes the grammar has already accepted, with each frame's schemas."""

    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas
        self.stack: list[Frame] = []
        self.expected: list[Any] | None = [schemas.root]  # schemas of the value owed next, None when none is
        self.lexeme: str | None = None  # "string", "key", "number" or "literal"
        self.escape = False
        self.done = False

    def copy(self) -> Tracker:
        twin = Tracker.__new__(Tracker)
        twin.schemas, twin.expected = self.schemas, self.expected
        twin.stack = [frame.copy() for frame in self.stack]
        twin.lexeme, twin.escape, twin.done = self.lexeme, self.escape, self.done
        return twin

    def feed(self, data: bytes) -> None:
        for b in data:
            self._byte(b)

    def _alternatives(self) -> list[dict[str, Any]]:
        return [alt for schema in self.expected or [] for alt in self.schemas.resolve(schema)]

    def _start_value(self, b: int) -> None:
        alternatives = self._alternatives()
        if b == OPEN_OBJECT:
            self.stack.append(Frame("object", [a for a in alternatives if self.schemas.kind(a) != "array"]))
        elif b == OPEN_ARRAY:
            self.stack.append(Frame("array", [a for a in alternatives if self.schemas.kind(a) != "object"]))
        elif b == QUOTE:
            self.lexeme = "string"
        elif b in b"-0123456789":
            self.lexeme = "number"
        else:
            self.lexeme = "literal"
        self.expected = None

    def _value_ended(self) -> None:
        if not self.stack:
            self.done = True
            return
        frame = self.stack[-1]
        if frame.kind == "array":
            frame.count += 1
        frame.state = "after"

    def _byte(self, b: int) -> None:
        if self.lexeme in ("string", "key"):
            self._string_byte(b)
            return
        if self.lexeme in ("number", "literal"):
            if b in b"-+.eE0123456789" or (self.lexeme == "literal" and 97 <= b <= 122):
                return
            self.lexeme = None
            self._value_ended()  # and this byte is structural
        if b in WHITESPACE:
            return
        if self.expected is not None:
            self._start_value(b)
            return
        frame = self.stack[-1]
        if frame.kind == "array" and frame.state == "start" and b != CLOSE_ARRAY:
            self.expected = [self.schemas.item_schema(a, 0) for a in frame.alternatives] or [True]
            self._start_value(b)
        elif frame.kind == "object":
            self._object_byte(frame, b)
        elif b == COMMA:
            frame.state = "value"
            self.expected = [self.schemas.item_schema(a, frame.count) for a in frame.alternatives] or [True]
        elif b == CLOSE_ARRAY:
            self.stack.pop()
            self._value_ended()

    def _string_byte(self, b: int) -> None:
        if self.escape:
            self.escape = False
        elif b == BACKSLASH:
            self.escape = True
        elif b == QUOTE:
            if self.lexeme == "key":
                frame = self.stack[-1]
                frame.keys.append(json.loads(b'"' + bytes(frame.key_bytes) + b'"'))
                frame.key_bytes.clear()
                frame.state = "colon"
            else:
                self._value_ended()
            self.lexeme = None
            return
        if self.lexeme == "key":
            self.stack[-1].key_bytes.append(b)

    def _object_byte(self, frame: Frame, b: int) -> None:
        if b == QUOTE:
            self.lexeme = "key"
        elif b == COLON:
            self.expected = [self.schemas.property_schema(a, frame.keys[-1]) for a in frame.alternatives] or [True]
            frame.state = "value"
        elif b == COMMA:
            frame.state = "key"
        elif b == CLOSE_OBJECT:
            self.stack.pop()
            self._value_ended()

    def end_lexeme(self) -> None:
        """Take a number or literal fed so far as finished (it ends at the next structural byte)."""
        if self.lexeme in ("number", "literal"):
            self.lexeme = None
            self._value_ended()

    def _close(self, frame: Frame, schema: dict[str, Any], inner_open: bool) -> bytes | None:
        """Bytes that close `frame` under `schema`; `inner_open`: a nested container above it closes first."""
        schemas, layout = self.schemas, self.schemas.layout
        out = bytearray()
        if inner_open:
            frame = frame.copy()
            if frame.kind == "array":
                frame.count += 1
            frame.state = "after"
        if frame.kind == "array":
            owed = max(schema.get("minItems", 0) - frame.count, 1 if frame.state == "value" else 0)
            first = frame.state in ("start", "value")
            for index in range(owed):
                value = schemas.shortest(schemas.item_schema(schema, frame.count + index))
                if value is None:
                    return None
                out += (b"" if first else layout.item) + value
                first = False
                if len(out) > MAX_SHORTEST_BYTES:
                    raise SchemaTooCostly(f"the schema's shortest answer is longer than {MAX_SHORTEST_BYTES} bytes")
            return bytes(out + b"]")
        state, written = frame.state, set(frame.keys)
        if state == "colon":
            out += layout.key
            state = "value"
        if state == "value":
            value = schemas.shortest(schemas.property_schema(schema, frame.keys[-1]))
            if value is None:
                return None
            out += value
            state = "after"
        order = schemas.property_order(schema)
        missing = [k for k in order if k in schema.get("required", []) and k not in written]
        first = not frame.keys
        if state == "key":  # after a separator, one more property is owed
            first = True
            if not missing:
                later = order[order.index(frame.keys[-1]) + 1 :] if frame.keys and frame.keys[-1] in order else order
                later = [k for k in later if k not in written]
                if not later:
                    return None
                missing = later[:1]
        for key in missing:
            value = schemas.shortest(schemas.property_schema(schema, key))
            if value is None:
                return None
            out += (b"" if first else layout.item) + json.dumps(key).encode() + layout.key + value
            first = False
        return bytes(out + b"}")

    def structural_endings(self) -> list[bytes]:
        """Candidate endings from a state between lexemes, shortest first (a few per frame's alternatives)."""
        if self.done:
            return [b""]
        if self.expected is not None:  # a value is owed before the innermost frame can close
            endings = []
            values = {v for v in (self.schemas.shortest(s) for s in self.expected) if v is not None}
            for value in sorted(values, key=len):
                after = self.copy()
                after.feed(value)
                after.end_lexeme()
                endings.extend(value + rest for rest in after.structural_endings())
            return sorted(endings, key=len)[:9]
        endings = [b""]
        for depth, frame in enumerate(reversed(self.stack)):
            closings = {self._close(frame, alt, depth > 0) for alt in frame.alternatives or [{}]}
            options = sorted((c for c in closings if c is not None), key=len)
            if not options:
                return []
            endings = sorted({e + o for e in endings for o in options[:3]}, key=len)[:9]
        return endings


class Completer:
    """Fed the bytes of an answer's JSON document as they are generated; answers its shortest valid ending."""

    def __init__(self, schema: dict[str, Any], layout: Layout, schemas: Schemas | None = None) -> None:
        """`schemas`: the shortest values already found for this schema, shared by the answer's documents."""
        document = {**schema, "x-guidance": layout.options()}
        self.shadow = llg.LLMatcher(BYTE_TOKENIZER, llg.grammar_from("json_schema", json.dumps(document)), log_level=0)
        if self.shadow.is_error():
            raise ValueError(self.shadow.get_error())
        self.tracker = Tracker(schemas or Schemas(schema, layout))

    def copy(self) -> Completer:
        twin = Completer.__new__(Completer)
        twin.shadow, twin.tracker = self.shadow.deep_copy(), self.tracker.copy()
        return twin

    @property
    def complete(self) -> bool:
        return self.shadow.is_accepting() and self.tracker.lexeme is None

    def feed(self, data: bytes) -> bool:
        if data and not self.shadow.consume_tokens(list(data)):
            return False
        self.tracker.feed(data)
        return True

    def ending(self) -> bytes | None:
        """The fewest bytes that make the document complete and valid from here; None if none was found."""
        # What the grammar forces next (the rest of a separator, a key's opening quote) comes first.
        shadow, tracker = self.shadow.deep_copy(), self.tracker.copy()
        prefix = shadow.compute_ff_bytes()
        if prefix:
            shadow.consume_tokens(list(prefix))
            tracker.feed(prefix)
        if tracker.lexeme is not None:
            in_string = tracker.lexeme in ("string", "key")
            done = _key_ended if tracker.lexeme == "key" else _value_may_end
            lexeme = shortest_bytes(shadow, in_string, tracker.escape, done)
            if lexeme is None:
                return None
            prefix += lexeme
            tracker.feed(lexeme)
            tracker.end_lexeme()
        for structure in tracker.structural_endings():
            candidate = prefix + structure
            if completes(self.shadow, candidate):
                return candidate
        return None
