"""The OpenAPI 3.1 document of every route, exact enough for schema-driven tools (client generators, fuzzers): built
from the same schemas/ files the routes validate with, the served model names as the only `{model}` values, every
status a route can answer declared with its body, and Server-Sent Events described event by event (each event an
object of `data` and `event`, its JSON `data` given by `contentSchema`, as schemathesis and the 3.2 draft read a
stream's schema).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .config import SCHEMAS_DIR
from .contract import documented, documented_result
from .model_store import ModelStore
from .surfaces.openai import PREFIXES as OPENAI_PREFIXES

ACCOUNT = {
    "name": "account_id",
    "in": "path",
    "required": True,
    "description": "Any account id: the server serves every account alike",
    "schema": {"type": "string"},
}
ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}
OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
# What each status means on the API's routes (the envelope's codes) and on the OpenAI ones.
STATUS = {
    400: "Bad input (5006), unknown model (5007) or a missing body (3003)",
    401: "Authentication error (10000): no token, where --api-token is set",
    403: "Authentication error (10000): a wrong token",
    404: "No such route (7003), LoRA adapter or fine-tune (3042), or model",
    405: "Method not allowed (7001); the Allow header lists the methods that are",
    409: "A fine-tune of that name, or that asset, exists already (5006)",
    413: "The body is over --max-body-bytes (3006)",
    429: "Out of capacity (3040): the queue is full",
    500: "Generation failed (3043)",
    501: "Not offered (7000)",
    503: "Out of capacity (3040): the model is still loading",
}
RUN_ERRORS = (400, 401, 403, 404, 405, 413, 429, 500, 503)
READ_ERRORS = (400, 401, 403, 405)


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / name).read_text())


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(statuses: tuple[int, ...], body: dict[str, Any] = ENVELOPE) -> dict[str, Any]:
    return {str(status): _json(body, STATUS[status]) for status in statuses}


def _envelope(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "result": result,
            "success": {"const": True},
            "errors": {"type": "array", "maxItems": 0},
            "messages": {"type": "array"},
        },
        "required": ["result", "success", "errors", "messages"],
    }


def _events(event: str, description: str) -> dict[str, Any]:
    """An event stream whose every event carries `data: <JSON of the event schema>` or `data: [DONE]`."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": event}}
    schema = {
        "type": "object",
        "properties": {"event": {"const": "message"}, "data": {"anyOf": [{"const": "[DONE]"}, data]}},
        "required": ["data"],
    }
    # A media type object has no description of its own (OpenAPI 3.1): the schema carries it.
    return {"schema": {"description": description, **schema}}


def _path_params(path: str, models: list[str]) -> list[dict[str, Any]]:
    params = []
    if "{account_id}" in path:
        params.append(ACCOUNT)
    if "{model}" in path:
        params.append(
            {
                "name": "model",
                "in": "path",
                "required": True,
                "description": "A served model; its slashes may be sent literally or percent-encoded",
                "schema": {"type": "string", "enum": models},
            }
        )
    if "{finetune}" in path:
        finetune = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
        params.append({"name": "finetune", "in": "path", "required": True, "schema": finetune})
    return params


def _with_model_enum(schema: dict[str, Any], models: list[str]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema["properties"]["model"] = {**schema["properties"]["model"], "enum": models}
    return schema


def _streaming_post(
    summary: str, request: str, answered: str, result: dict[str, Any], events: dict[str, Any], errors: dict[str, Any]
) -> dict[str, Any]:
    """A run: its JSON body, and a JSON answer or, with stream: true, Server-Sent Events."""
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
            },
            "responses": {
                "200": {
                    "description": answered,
                    "content": {"application/json": {"schema": result}, "text/event-stream": events},
                },
                **errors,
            },
        }
    }


def _run_operation(
    summary: str, result: dict[str, Any], request: str, parameters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    events = _events("#/components/schemas/RunEvent", "Workers AI's events")
    answered = "The result, or Server-Sent Events with stream: true"
    operation = _streaming_post(summary, request, answered, result, events, _errors(RUN_ERRORS))
    if parameters:
        operation["post"]["parameters"] = parameters
    return operation


def _openai_operation(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
    result = {"type": "object", "required": ["id", "choices", "usage"]}
    events = _events(f"#/components/schemas/{chunk}", "OpenAI's chunks")
    answered = f"A {answer}, or its chunks with stream: true"
    return _streaming_post(summary, request, answered, result, events, _errors(RUN_ERRORS, OPENAI_ERROR))


def _get(
    summary: str,
    result: dict[str, Any],
    errors: tuple[int, ...] = READ_ERRORS,
    body: dict[str, Any] = ENVELOPE,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary}
    if parameters:
        operation["parameters"] = parameters
    operation["responses"] = {"200": _json(result, summary), **_errors(errors, body)}
    return {"get": operation}


def build(store: ModelStore) -> dict[str, Any]:
    models = sorted(store.models)
    # The served models are text-generation models sharing one published input and output schema.
    model = next(iter(store.models.values()))
    run_input = documented(_schema(model.input_schema))
    result = documented_result(_schema(model.output_schema))
    binding_headers = [
        {
            "name": "cf-consn-model-id",
            "in": "header",
            "required": True,
            "description": "The model, as the binding names it",
            "schema": {"type": "string", "enum": models},
        },
        {
            "name": "version",
            "in": "query",
            "required": False,
            "description": "workerd sends 3; the server answers every version alike",
            "schema": {"type": "string"},
        },
    ]
    binding = _run_operation(
        "The Worker binding's request (env.AI.run): the bare result, or Workers AI's events",
        {"$ref": "#/components/schemas/RunResult"},
        "BindingRun",
        binding_headers,
    )
    gateway_binding = _run_operation(
        "The Worker binding's request with a `gateway` option (env.AI.run through an AI Gateway)",
        {"$ref": "#/components/schemas/RunResult"},
        "GatewayBindingRun",
        binding_headers,
    )
    run = _run_operation(
        "Run a text-generation model (Workers AI)",
        _envelope({"$ref": "#/components/schemas/RunResult"}),
        "RunInput",
    )
    tokenize = {
        "post": {
            "summary": "An extension: the text and token ids a run body becomes",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunInput"}}},
            },
            "responses": {
                "200": _json(
                    _envelope(
                        {
                            "type": "object",
                            "properties": {"prompt": {"type": "string"}, "tokens": {"type": "array"}},
                            "required": ["prompt", "tokens"],
                        }
                    ),
                    "The prompt as the model would see it",
                ),
                **_errors((400, 401, 403, 404, 405, 413, 503)),
            },
        }
    }
    search_parameters = [
        {"name": "search", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "task", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "page", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
        {
            "name": "per_page",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
    ]
    search = _get(
        "Search the served models",
        {"type": "object", "required": ["result", "result_info"]},
        parameters=search_parameters,
    )
    binding_models = _get(
        "The served models, as a Worker's env.AI.models() asks", {"type": "object"}, parameters=search_parameters
    )
    model_query = {"name": "model", "in": "query", "required": True, "schema": {"type": "string", "enum": models}}
    schema_of = _get("A model's input and output JSON Schemas", _envelope({"type": "object"}), parameters=[model_query])
    finetune_result = _envelope({"type": "object"})
    paths: dict[str, Any] = {
        "/client/v4/accounts/{account_id}/ai/run/{model}": run,
        "/ai/run/{model}": run,
        "/ai/tokenize/{model}": tokenize,
        "/run": binding,
        "/ai-gateway/run": gateway_binding,
        "/ai-api/models/search": binding_models,
        "/client/v4/accounts/{account_id}/ai/models/search": search,
        "/client/v4/accounts/{account_id}/ai/models/schema": schema_of,
        "/client/v4/accounts/{account_id}/ai/finetunes": {
            "post": {
                "summary": "Create a LoRA fine-tune",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FinetuneCreate"}}},
                },
                "responses": {"200": _json(finetune_result, "The fine-tune"), **_errors((*READ_ERRORS, 409, 413))},
            },
            "get": {
                "summary": "List fine-tunes",
                "responses": {"200": _json(_envelope({"type": "array"}), "The fine-tunes"), **_errors(READ_ERRORS)},
            },
        },
        "/client/v4/accounts/{account_id}/ai/finetunes/{finetune}/finetune-assets": {
            "post": {
                "summary": "Upload adapter_config.json or adapter_model.safetensors",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "file_name": {"enum": ["adapter_config.json", "adapter_model.safetensors"]},
                                    "file": {"type": "string", "format": "binary"},
                                },
                                "required": ["file_name", "file"],
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(finetune_result, "The fine-tune with the asset"),
                    **_errors((*READ_ERRORS, 404, 409, 413, 503)),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "503 while the model loads, 200 when ready",
                "responses": {
                    "200": _json({"type": "object", "required": ["status"]}, "Ready"),
                    "405": _json(ENVELOPE, STATUS[405]),
                    "503": _json({"type": "object", "required": ["status"]}, "Loading, or failed"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors((401, 403, 405)),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), "405": _json(ENVELOPE, STATUS[405])},
            }
        },
        "/": {
            "get": {
                "summary": "The browser playground (or, with MF-Binding in the query and a websocket upgrade, "
                "Miniflare 4's RPC probe, answered 501)",
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                    "405": _json(ENVELOPE, STATUS[405]),
                    "501": _json(ENVELOPE, STATUS[501]),
                },
            },
            "post": {
                "summary": "The Worker binding's request as Miniflare's remote proxy forwards it: the inner URL in "
                "MF-URL, the original headers as MF-Header-*. With API tokens, the connection string is "
                "/binding/<token>",
                "parameters": [
                    {
                        "name": "MF-URL",
                        "in": "header",
                        "required": True,
                        "schema": {
                            "enum": [
                                "https://workers-binding.ai/run?version=3",
                            ]
                        },
                    },
                    {
                        "name": "MF-Binding",
                        "in": "header",
                        "required": False,
                        "description": "The binding's name in the Worker's configuration (e.g. AI): not checked",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "MF-Header-cf-consn-model-id",
                        "in": "header",
                        "required": True,
                        "schema": {"enum": models},
                    },
                ],
                "requestBody": binding["post"]["requestBody"],
                "responses": binding["post"]["responses"],
            },
        },
    }
    for prefix in OPENAI_PREFIXES:
        paths[f"{prefix}/chat/completions"] = _openai_operation(
            "OpenAI-compatible chat completions", "ChatCompletionRequest", "chat.completion", "ChatCompletionChunk"
        )
        paths[f"{prefix}/completions"] = _openai_operation(
            "OpenAI-compatible text completions", "CompletionRequest", "text_completion", "CompletionChunk"
        )
        paths[f"{prefix}/models"] = _get(
            "Served models", {"type": "object", "required": ["data"]}, (401, 403, 405), OPENAI_ERROR
        )
        paths[f"{prefix}/models/{{model}}"] = _get(
            "One served model", {"type": "object", "required": ["id"]}, (401, 403, 404, 405), OPENAI_ERROR
        )
    for path, item in paths.items():
        params = _path_params(path, models)
        if params:
            # Paths share operation objects (the run route has two spellings); parameters differ per path.
            paths[path] = {**item, "parameters": params}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "workers-ai-local",
            "version": "0.1.0",
            "description": "The Cloudflare Workers AI text-generation API for the served models, run locally.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "RunInput": run_input,
                "RunResult": result,
                "BindingRun": {
                    "type": "object",
                    "properties": {
                        "inputs": {"$ref": "#/components/schemas/RunInput"},
                        "options": {
                            "type": ["object", "null"],
                            "properties": {"rejectIfBusy": {"type": ["boolean", "null"]}},
                        },
                    },
                    "required": ["inputs"],
                },
                # What workerd sends for {gateway: {...}} (server/gateway/layer.py reads it).
                "GatewayBindingRun": {
                    "type": "object",
                    "properties": {
                        "inputs": {"$ref": "#/components/schemas/RunInput"},
                        "options": {
                            "type": "object",
                            "properties": {
                                "gateway": {
                                    "type": "object",
                                    "properties": {
                                        "id": {"type": "string", "minLength": 1},
                                        "skipCache": {"type": ["boolean", "null"]},
                                        "cacheTtl": {"type": ["number", "null"], "minimum": 0, "maximum": 1e9},
                                        "cacheKey": {"type": ["string", "null"]},
                                        "metadata": {
                                            "type": ["object", "null"],
                                            "additionalProperties": {"not": {"type": ["object", "array"]}},
                                        },
                                        "collectLog": {"type": ["boolean", "null"]},
                                    },
                                    "required": ["id"],
                                },
                                "rejectIfBusy": {"type": ["boolean", "null"]},
                            },
                            "required": ["gateway"],
                        },
                    },
                    "required": ["inputs", "options"],
                },
                "RunEvent": _run_event(result),
                "ChatCompletionRequest": _with_model_enum(
                    _schema("openai.chat-completions.request.schema.json"), models
                ),
                "CompletionRequest": _with_model_enum(_schema("openai.completions.request.schema.json"), models),
                "ChatCompletionChunk": _openai_chunk("chat.completion.chunk"),
                "CompletionChunk": _openai_chunk("text_completion"),
                "FinetuneCreate": _with_model_enum(_schema("finetune.create.request.schema.json"), models),
                "Error": {
                    "type": "object",
                    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                    "required": ["code", "message"],
                },
                "ErrorEnvelope": {
                    "type": "object",
                    "properties": {
                        "result": {"type": "null"},
                        "success": {"const": False},
                        "errors": {"type": "array", "items": {"$ref": "#/components/schemas/Error"}, "minItems": 1},
                        "messages": {"type": "array"},
                    },
                    "required": ["result", "success", "errors", "messages"],
                },
                "OpenAIError": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": ["string", "null"]},
                            },
                            "required": ["message", "type", "param", "code"],
                        }
                    },
                    "required": ["error"],
                },
            },
        },
    }


def _run_event(result: dict[str, Any]) -> dict[str, Any]:
    """One event of Workers AI's stream: a piece of text, the tool calls, the usage, or a failure."""
    usage = {
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    }
    padding = {"type": "string", "description": "Random-length padding that hides token lengths"}
    return {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "response": {"type": "string"},
                    "tool_calls": result["properties"]["tool_calls"],
                    "usage": usage,
                    "p": padding,
                },
                "required": ["response"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"error": {"$ref": "#/components/schemas/Error"}},
                "required": ["error"],
                "additionalProperties": False,
            },
        ]
    }


def _openai_chunk(kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array"},
            "usage": {"type": "object"},
            "error": {"type": "object"},
        },
    }
