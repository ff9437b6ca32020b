"""What a JSON Schema from a request (JSON mode's `json_schema`, a tool's `parameters`) may cost, checked before any
work is done on it: the grammar compiler, the shortest-answer computation (engine/completion.py) and the answer's
validation all walk the schema, some recursively and some for as many items as a keyword asks.

Each limit is refused with a 400 naming the keyword, where it is, and the limit. The check itself is one iterative
pass over the schema (no recursion, so no depth can overflow it), linear in the schema's size.

`$ref` is resolved as the shortest-answer computation resolves it: a JSON Pointer into the same schema (`#`,
`#/$defs/name`, `#/properties/a/anyOf/0`, percent-escapes decoded), to an object or a boolean schema. Anything
else (an `$anchor` name, another document) is refused rather than half-followed; so is a `$ref` or
`anyOf`/`oneOf`/`allOf` cycle that never reaches a value (`{"anyOf": [{"$ref": "#"}]}`), which no finite answer
could ever leave. A tool's parameters are embedded in the call's schema, so there a `$ref` must name one of its
own `$defs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .engine.completion import MAX_REF_CHAIN, PointerError, resolve_pointer

# Subschemas nested in one another (OpenAI's structured outputs allow 10 levels of objects).
MAX_DEPTH = 32
# Subschemas in all of a request's schemas together (OpenAI allows 5,000 object properties).
MAX_NODES = 10_000
# Values of one `enum` (OpenAI allows 1,000).
MAX_ENUM = 1_000
# Lower bounds that the shortest answer must meet item by item, or that a grammar spells out as a repetition.
COUNT_LIMITS = {
    "minItems": 1_024,
    "maxItems": 100_000,
    "minLength": 4_096,
    "maxLength": 100_000,
    "minProperties": 1_024,
    "maxProperties": 100_000,
    "minContains": 1_024,
    "maxContains": 100_000,
}

# Keywords whose value is a schema, a list of schemas, or an object of schemas.
_ONE = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains")
_ONE += ("propertyNames", "unevaluatedItems", "unevaluatedProperties")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords under which a schema applies to the same value as its parent: a cycle through these alone never ends.
_SAME_VALUE = ("allOf", "anyOf", "oneOf")


class SchemaTooCostly(ValueError):
    """A schema over one of the limits above, or with a `$ref` that cannot be followed: the message says which."""


@dataclass
class SchemaBudget:
    """The subschemas a request's schemas may hold in all."""

    nodes: int = MAX_NODES


def _children(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """(path step, subschema) for every subschema directly under `schema`."""
    found: list[tuple[str, Any]] = []
    for keyword in _ONE:
        if keyword in schema:
            value = schema[keyword]
            if isinstance(value, list):  # `items` as a list, in drafts before 2020-12
                found += [(f"{keyword}/{i}", v) for i, v in enumerate(value)]
            else:
                found.append((keyword, value))
    for keyword in _LIST:
        if isinstance(schema.get(keyword), list):
            found += [(f"{keyword}/{i}", v) for i, v in enumerate(schema[keyword])]
    for keyword in _MAP:
        if isinstance(schema.get(keyword), dict):
            for name, value in schema[keyword].items():
                found.append((f"{keyword}/{name.replace('~', '~0').replace('/', '~1')}", value))
    return found


def check_schema(schema: Any, where: str, budget: SchemaBudget | None = None, definitions_only: bool = False) -> None:
    """Raise SchemaTooCostly if `schema` is over a limit or holds a `$ref` that cannot be followed. `where` names
    the schema in messages ("'/response_format/json_schema'"); `definitions_only`: a `$ref` may only name one of
    the schema's own `$defs` or `definitions` (a tool's parameters, which are embedded in another schema)."""
    budget = budget or SchemaBudget()
    nodes: list[dict[str, Any]] = []
    stack: list[tuple[Any, str, int]] = [(schema, "", 0)]
    while stack:
        node, at, depth = stack.pop()
        if not isinstance(node, dict):
            continue  # a boolean schema, or no schema at all (the metaschema check words that)
        budget.nodes -= 1
        if budget.nodes < 0:
            raise SchemaTooCostly(f"{where} holds more than {MAX_NODES} subschemas in all (the limit)")
        if depth > MAX_DEPTH:
            raise SchemaTooCostly(f"{where} nests subschemas deeper than {MAX_DEPTH} levels (the limit) at '{at}'")
        _check_keywords(node, where, at or "/")
        if "$ref" in node:
            _check_ref(schema, node["$ref"], where, at or "/", definitions_only)
        nodes.append(node)
        stack.extend((child, f"{at}/{step}", depth + 1) for step, child in _children(node))
    _check_cycles(schema, nodes, where)


def _check_keywords(node: dict[str, Any], where: str, at: str) -> None:
    for keyword, limit in COUNT_LIMITS.items():
        value = node.get(keyword)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > limit:
            raise SchemaTooCostly(f"{where}: '{keyword}' at '{at}' is {value}, over the limit of {limit}")
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > MAX_ENUM:
        raise SchemaTooCostly(f"{where}: 'enum' at '{at}' lists {len(enum)} values, over the limit of {MAX_ENUM}")


def _check_ref(root: Any, ref: Any, where: str, at: str, definitions_only: bool) -> None:
    if not isinstance(ref, str):
        return  # the metaschema check words that
    if definitions_only:
        parts = ref.split("/")
        plain = len(parts) == 3 and not any(c in parts[2] for c in "%~")
        if not (plain and parts[0] == "#" and parts[1] in ("$defs", "definitions")):
            raise SchemaTooCostly(
                f"{where}: '$ref' {ref!r} at '{at}' is not supported: a tool's parameters may refer only to their "
                "own definitions, as '#/$defs/NAME'"
            )
        definitions = root.get(parts[1]) if isinstance(root, dict) else None
        if not isinstance(definitions, dict) or parts[2] not in definitions:
            raise SchemaTooCostly(f"{where}: '$ref' {ref!r} at '{at}' names no definition of the schema")
        return
    try:
        resolve_pointer(root, ref)
    except PointerError as exc:
        raise SchemaTooCostly(f"{where}: '$ref' {ref!r} at '{at}' cannot be followed: {exc}") from exc


def _same_value(root: Any, node: dict[str, Any]) -> list[dict[str, Any]]:
    """The subschemas that apply to the same value as `node`: its `$ref`'s target and its alternatives."""
    children = [v for keyword in _SAME_VALUE if isinstance(node.get(keyword), list) for v in node[keyword]]
    if isinstance(node.get("$ref"), str):
        try:
            children.append(resolve_pointer(root, node["$ref"]))
        except PointerError:
            pass  # refused by _check_ref
    return [child for child in children if isinstance(child, dict)]


def _check_cycles(root: Any, nodes: list[dict[str, Any]], where: str) -> None:
    """Refuse a cycle of `$ref` and `anyOf`/`oneOf`/`allOf` that applies a schema to the same value forever (no
    finite answer leaves it), and a chain of `$ref`s longer than the shortest-answer computation follows."""
    done: set[int] = set()
    for start in nodes:
        if id(start) in done:
            continue
        on_path: set[int] = {id(start)}
        stack = [(start, iter(_same_value(root, start)))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(id(node))
                done.add(id(node))
                continue
            if id(child) in on_path:
                raise SchemaTooCostly(
                    f"{where} refers to itself through '$ref', 'anyOf', 'oneOf' or 'allOf' with no value in between:"
                    " no answer can satisfy it"
                )
            if id(child) not in done:
                on_path.add(id(child))
                stack.append((child, iter(_same_value(root, child))))
        hops, target = 0, start
        while isinstance(target.get("$ref"), str):
            hops += 1
            if hops > MAX_REF_CHAIN:
                raise SchemaTooCostly(f"{where}: a chain of '$ref's is longer than {MAX_REF_CHAIN} (the limit)")
            try:
                target = resolve_pointer(root, target["$ref"])
            except PointerError:
                break
            if not isinstance(target, dict):
                break
