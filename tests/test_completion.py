"""The engine's shortest-ending search (server/engine/completion.py), byte by byte: from every prefix of valid
documents, the prefix plus the ending it finds must be a complete document that validates. No server needed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from workers_ai_local.engine.completion import Completer, Layout

STRING = {"type": "string"}
CASES = {
    "person": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 18, "maximum": 130},
                "email": {"type": "string", "format": "email"},
                "tags": {"type": "array", "items": STRING, "minItems": 2, "maxItems": 4},
            },
            "required": ["name", "age", "email", "tags"],
        },
        [{"name": 'Zoë "Z" Ünal', "age": 42, "email": "zoe@example.org", "tags": ["a", "bc", "déf"]}],
    ),
    "nested refs, formats, bounds": (
        {
            "$defs": {
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "minLength": 3},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "zip"],
                }
            },
            "type": "object",
            "properties": {
                "home": {"$ref": "#/$defs/address"},
                "work": {"$ref": "#/$defs/address"},
                "when": {"type": "string", "format": "date-time"},
                "id": {"type": "string", "format": "uuid"},
                "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
            },
            "required": ["home", "when", "id", "score"],
        },
        [
            {
                "home": {"street": "Main St", "zip": "12345"},
                "work": {"street": "Elm", "zip": "99999"},
                "when": "2024-05-06T07:08:09Z",
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "score": 7.25,
            }
        ],
    ),
    "anyOf, enum, const, date": (
        {
            "type": "object",
            "properties": {
                "kind": {"enum": ["circle", "square"]},
                "shape": {
                    "anyOf": [
                        {"type": "object", "properties": {"r": {"type": "number", "minimum": 1}}, "required": ["r"]},
                        {
                            "type": "object",
                            "properties": {"side": {"type": "integer", "minimum": 1000}},
                            "required": ["side"],
                        },
                    ]
                },
                "v": {"const": "v1"},
                "date": {"type": "string", "format": "date"},
            },
            "required": ["kind", "shape", "v", "date"],
        },
        [
            {"kind": "square", "shape": {"side": 12345}, "v": "v1", "date": "2024-02-29"},
            {"kind": "circle", "shape": {"r": 2500.5}, "v": "v1", "date": "1999-12-31"},
        ],
    ),
    "array of objects with minItems": (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer"},
                    "y": {"type": "array", "items": {"type": "boolean"}, "minItems": 1},
                },
                "required": ["x", "y"],
            },
            "minItems": 2,
        },
        [[{"x": -12, "y": [True, False]}, {"x": 3, "y": [False]}, {"x": 0, "y": [True]}]],
    ),
    "recursive tree": (
        {
            "$defs": {
                "tree": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}},
                    },
                    "required": ["v", "kids"],
                }
            },
            "$ref": "#/$defs/tree",
        },
        [{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3, "kids": []}]}]}],
    ),
    "a pattern that loops": (
        {"type": "object", "properties": {"p": {"type": "string", "pattern": "^(ab)*c$"}}, "required": ["p"]},
        [{"p": "ababc"}],
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_every_prefix_of_a_valid_document_has_a_valid_ending(name):
    schema, documents = CASES[name]
    checker = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for document in documents:
        data = json.dumps(document, ensure_ascii=False).encode()  # ", " and ": ", as Layout() allows
        completer = Completer(schema, Layout())
        for i in range(len(data) + 1):
            if i:
                assert completer.feed(data[i - 1 : i]), data[:i]
            ending = completer.ending()
            assert ending is not None, data[:i]
            checker.validate(json.loads(data[:i] + ending))
        assert completer.complete and completer.ending() == b""


def test_the_shortest_document_is_minimal():
    schema, _ = CASES["person"]
    assert Completer(schema, Layout()).ending() == b'{"name": "", "age": 18, "email": "1@1", "tags": ["", ""]}'
