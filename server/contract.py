"""The model's published input schema, enforced before any model work, and the request it describes.

Failures read the way Workers AI words them: `AiError: Bad input: Error: oneOf at '/' not met, 0 matches: ...`
followed by every path that failed and why, so a message names the property and the bound it broke.
"""

from __future__ import annotations

import copy
import json
import math
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

    def __post_init__(self) -> None:
        # Python's json reads NaN and Infinity, and JSON Schema's bounds cannot refuse NaN (it compares false with
        # every bound), nor Infinity where no bound is set. Every surface builds this request, so it is checked once.
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self.sampling, name)
            if value is not None and not math.isfinite(value):
                raise bad_input(f"Error: '/{name}' must be a finite number, got {value}")

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
        case "const":
            return f"'{at}' must be {json.dumps(bound)}, got {json.dumps(value)}"
        case "minItems":
            return f"'{at}' must hold at least {bound} item{'s' if bound != 1 else ''}, got {len(value)}"
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
        self.schema: dict[str, Any] = self.refine(json.loads(schema_path.read_text()))
        Draft202012Validator.check_schema(self.schema)
        self._validator = Draft202012Validator(self.schema)

    def refine(self, published: dict[str, Any]) -> dict[str, Any]:
        """The schema requests are held to, from the file's: the file's own here."""
        return published

    def check(self, body: object) -> dict[str, Any]:
        errors = sorted(self._validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            raise bad_input("Error: " + _describe_all(errors))
        assert isinstance(body, dict)
        return body


JSON_TYPES = ["string", "number", "integer", "boolean", "array", "object", "null"]
# JSON mode, an extension (Workers AI documents it for this model's siblings): one of two shapes, not streamed,
# not with tools.
RESPONSE_FORMAT = {
    "description": "JSON mode (an extension): the answer is a JSON object, of this JSON Schema for json_schema",
    "type": "object",
    "properties": {"type": {"enum": ["json_object", "json_schema"]}, "json_schema": {"type": "object"}},
    "required": ["type"],
    "if": {"properties": {"type": {"const": "json_schema"}}},
    "then": {"required": ["json_schema"]},
}
JSON_MODE_ALONE = {
    "if": {"required": ["response_format"]},
    "then": {
        "properties": {
            "stream": {"const": False},
            "tools": {"type": "array", "maxItems": 0},
        }
    },
}


def refined(published: dict[str, Any]) -> dict[str, Any]:
    """The published input schema with what the server adds to it, so that one schema says what is accepted: a
    request for no tokens at all and a conversation of no turns are refused (the published schema leaves both
    open); a tool parameter's `type` is a JSON type, and its `description` optional, as on the platform; JSON mode
    is described. The served OpenAPI document states
    the same schema."""
    schema = copy.deepcopy(published)
    for branch in schema.get("oneOf", []):
        properties = branch.get("properties", {})
        if "max_tokens" in properties:
            properties["max_tokens"]["minimum"] = 1
        if "messages" in properties:
            properties["messages"]["minItems"] = 1
        for shape in properties.get("tools", {}).get("items", {}).get("oneOf", []):
            spec = shape["properties"].get("function", shape)
            parameter = spec["properties"]["parameters"]["properties"]["properties"]["additionalProperties"]
            parameter["properties"]["type"] = {**parameter["properties"]["type"], "enum": JSON_TYPES}
            # The platform takes a parameter without a description (langchain-cloudflare's live tests bind such
            # tools, `get_weather(city: str)`, on models of this very tools schema), though the schema requires one.
            parameter["required"] = [name for name in parameter["required"] if name != "description"]
        properties["response_format"] = RESPONSE_FORMAT
    return schema


def documented(published: dict[str, Any]) -> dict[str, Any]:
    """The refined schema as the OpenAPI document states it: with JSON mode's rules on stream and tools too, which
    the server checks itself (check_response_format) to word its refusal better than a schema error could."""
    schema = refined(published)
    for branch in schema.get("oneOf", []):
        branch["allOf"] = [*branch.get("allOf", []), JSON_MODE_ALONE]
    return _without_binary(schema)


def documented_result(published: dict[str, Any]) -> dict[str, Any]:
    """The published output schema's JSON result as the OpenAPI document states it: in JSON mode `response` is
    the JSON value itself (as Workers AI answers its siblings' JSON mode), not a string."""
    result = next(b for b in published["oneOf"] if b.get("contentType") == "application/json")
    result = {key: copy.deepcopy(value) for key, value in result.items() if key != "contentType"}
    response = result["properties"]["response"]
    result["properties"]["response"] = {
        "description": response["description"] + "; in JSON mode, the JSON value itself",
        "type": JSON_TYPES,
    }
    return result


def _without_binary(schema: Any) -> Any:
    """`format: binary` means raw bytes in OpenAPI, which a JSON body cannot hold: there such a field is a string."""
    if isinstance(schema, dict):
        return {k: _without_binary(v) for k, v in schema.items() if not (k == "format" and v == "binary")}
    if isinstance(schema, list):
        return [_without_binary(item) for item in schema]
    return schema


class InputContract(SchemaCheck):
    """One model's input schema, refined (see `refined`)."""

    def refine(self, published: dict[str, Any]) -> dict[str, Any]:
        return refined(published)

    def parse(self, body: object) -> RunRequest:
        request = RunRequest.from_body(self.check(body))
        if request.response_format is not None:
            check_response_format(request)
        return request


def check_response_format(request: RunRequest) -> None:
    """JSON mode's rules on the rest of the request, worded better than a schema error could word them (its own
    shape is in the refined schema)."""
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
