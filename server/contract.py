"""The model's published input schema, enforced before any model work, and the request it describes.

Failures read the way Workers AI words them: `AiError: Bad input: Error: oneOf at '/' not met, 0 matches: ...`
followed by every path that failed and why, so a message names the property and the bound it broke.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, ValidationError

from .engine import SamplingParams
from .errors import bad_input

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6

_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


@dataclass(frozen=True)
class RunRequest:
    """A validated body of `POST .../ai/run/{model}` for a text-generation model."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    raw: bool
    stream: bool
    max_tokens: int
    sampling: SamplingParams
    tools: list[dict[str, Any]] | None
    lora: str | None
    response_format: dict[str, Any] | None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RunRequest:
        def number(name: str) -> float | None:
            value = body.get(name)
            return None if value is None else float(value)

        def integer(name: str) -> int | None:
            value = body.get(name)
            return None if value is None else int(value)

        return cls(
            prompt=body.get("prompt"),
            messages=body.get("messages"),
            raw=bool(body.get("raw", False)),
            stream=bool(body.get("stream", False)),
            max_tokens=int(body.get("max_tokens", DEFAULT_MAX_TOKENS)),
            sampling=SamplingParams(
                temperature=float(body.get("temperature", DEFAULT_TEMPERATURE)),
                top_p=number("top_p"),
                top_k=integer("top_k"),
                seed=integer("seed"),
                repetition_penalty=number("repetition_penalty"),
                frequency_penalty=number("frequency_penalty"),
                presence_penalty=number("presence_penalty"),
            ),
            tools=body.get("tools") or None,
            lora=body.get("lora"),
            response_format=body.get("response_format"),
        )


def _pointer(error: ValidationError) -> str:
    return "/" + "/".join(str(part) for part in error.absolute_path)


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _describe(error: ValidationError) -> str:
    at = _pointer(error)
    bound = error.validator_value
    value = error.instance
    match error.validator:
        case "oneOf":
            failed_branches = {sub.schema_path[0] for sub in error.context or []}
            matches = len(bound) - len(failed_branches)
            head = f"oneOf at '{at}' not met, {matches} matches"
            reasons = _describe_all(sorted(error.context or [], key=lambda e: list(e.schema_path)))
            return f"{head}: {reasons}" if reasons else head
        case "required":
            missing = [name for name in bound if name not in value]
            return f"required properties at '{at}' are {', '.join(repr(name) for name in missing)}"
        case "type":
            expected = bound if isinstance(bound, str) else ", ".join(bound)
            return f"Type mismatch of '{at}', '{_json_type(value)}' not in '{expected}'"
        case "minimum":
            return f"'{at}' must be >= {bound}, got {value}"
        case "maximum":
            return f"'{at}' must be <= {bound}, got {value}"
        case "minLength":
            return f"'{at}' must be at least {bound} characters long, got {len(value)}"
        case "maxLength":
            return f"'{at}' must be at most {bound} characters long, got {len(value)}"
        case _:
            return f"{error.message} at '{at}'"


def _describe_all(errors: list[ValidationError]) -> str:
    # Both branches of the top-level oneOf share most properties, so one bad value fails twice; say it once.
    return ", ".join(dict.fromkeys(_describe(error) for error in errors))


class SchemaCheck:
    """A request body checked against a JSON Schema file, failures worded as Workers AI words them."""

    def __init__(self, schema_path: Path) -> None:
        self.schema: dict[str, Any] = json.loads(schema_path.read_text())
        Draft202012Validator.check_schema(self.schema)
        self._validator = Draft202012Validator(self.schema)

    def check(self, body: object) -> dict[str, Any]:
        errors = sorted(self._validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            raise bad_input("Error: " + _describe_all(errors))
        assert isinstance(body, dict)
        return body


class InputContract(SchemaCheck):
    """One model's input schema."""

    def parse(self, body: object) -> RunRequest:
        request = RunRequest.from_body(self.check(body))
        # The schema leaves max_tokens unbounded below; a request for no tokens at all is a client bug.
        if request.max_tokens < 1:
            raise bad_input(f"Error: '/max_tokens' must be >= 1, got {request.max_tokens}")
        if request.response_format is not None:
            check_response_format(request)
        return request


RESPONSE_FORMAT_TYPES = ("json_object", "json_schema")


def check_response_format(request: RunRequest) -> None:
    """JSON mode is not in this model's published schema (Workers AI documents it for its siblings), so its
    shape is checked here."""
    fmt = request.response_format
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMAT_TYPES:
        raise bad_input("Error: '/response_format/type' must be 'json_object' or 'json_schema'")
    if fmt["type"] == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise bad_input("Error: '/response_format/json_schema' must be an object holding the JSON Schema")
    if request.stream:
        raise bad_input("Error: JSON mode (response_format) does not support streaming; send stream: false")
    if request.tools:
        raise bad_input("Error: response_format and tools cannot be combined in one request")


def response_schema(fmt: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema an answer in JSON mode must validate against."""
    if fmt["type"] == "json_object":
        return {"type": "object"}
    schema = fmt["json_schema"]
    # OpenAI nests the schema as {"name", "schema"}; Workers AI's examples pass the schema itself.
    inner = schema.get("schema")
    return inner if isinstance(inner, dict) and "type" not in schema else schema
