"""The OpenAPI 3.1 document of every route, built from the same schemas/ files the routes validate with."""

from __future__ import annotations

import json
from typing import Any

from .config import SCHEMAS_DIR
from .model_store import ModelStore
from .surfaces.openai import PREFIXES as OPENAI_PREFIXES

ACCOUNT = {"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"}}
MODEL = {
    "name": "model",
    "in": "path",
    "required": True,
    "description": "A Workers AI model name; its slashes may be sent literally or percent-encoded",
    "schema": {"type": "string"},
}


def _schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS_DIR / name).read_text())


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _envelope(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "result": result,
            "success": {"type": "boolean"},
            "errors": {"type": "array", "items": {"$ref": "#/components/schemas/Error"}},
            "messages": {"type": "array"},
        },
        "required": ["result", "success", "errors", "messages"],
    }


ERRORS = {
    "4XX": _json({"$ref": "#/components/schemas/ErrorEnvelope"}, "Bad input, unknown model, auth, capacity"),
}
OPENAI_ERRORS = {"4XX": _json({"$ref": "#/components/schemas/OpenAIError"}, "OpenAI-shaped error")}


def _openai_post(summary: str, request_schema: str, answer: str) -> dict[str, Any]:
    body = {"schema": {"$ref": f"#/components/schemas/{request_schema}"}}
    streamed = {
        "description": f"{answer}, or its chunks with stream: true",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": body}},
            "responses": {"200": streamed, **OPENAI_ERRORS},
        }
    }


def _path_params(path: str) -> list[dict[str, Any]]:
    params = []
    if "{account_id}" in path:
        params.append(ACCOUNT)
    if "{model}" in path:
        params.append(MODEL)
    if "{finetune}" in path:
        params.append({"name": "finetune", "in": "path", "required": True, "schema": {"type": "string"}})
    return params


def build(store: ModelStore) -> dict[str, Any]:
    # The served models are text-generation models sharing one published input and output schema.
    model = next(iter(store.models.values()))
    run_input = _schema(model.input_schema)
    run_output = _schema(model.output_schema)
    chat = _schema("openai.chat-completions.request.schema.json")
    completion = _schema("openai.completions.request.schema.json")
    finetune = _schema("finetune.create.request.schema.json")
    json_result = next(b for b in run_output["oneOf"] if b.get("contentType") == "application/json")

    run = {
        "post": {
            "summary": "Run a text-generation model (Workers AI)",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunInput"}}},
            },
            "responses": {
                "200": {
                    "description": "The result in the envelope, or Server-Sent Events with stream: true",
                    "content": {
                        "application/json": {"schema": _envelope({"$ref": "#/components/schemas/RunResult"})},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **ERRORS,
            },
        }
    }
    binding_run = {
        "post": {
            "summary": "The Worker binding's run request (env.AI.run), sent by workerd or forwarded by Miniflare",
            "parameters": [
                {"name": "cf-consn-model-id", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "version", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BindingRun"}}},
            },
            "responses": {
                "200": {
                    "description": "The bare result, or Server-Sent Events when inputs.stream is true",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/RunResult"}},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **ERRORS,
            },
        }
    }
    paths: dict[str, Any] = {
        "/run": binding_run,
        "/ai-gateway/run": binding_run,
        "/client/v4/accounts/{account_id}/ai/run/{model}": run,
        "/ai/run/{model}": run,
        "/client/v4/accounts/{account_id}/ai/models/search": {
            "get": {
                "summary": "Search the served models",
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": t}}
                    for n, t in (("search", "string"), ("task", "string"), ("page", "integer"), ("per_page", "integer"))
                ],
                "responses": {"200": _json(_envelope({"type": "array", "items": {"type": "object"}})), **ERRORS},
            }
        },
        "/client/v4/accounts/{account_id}/ai/models/schema": {
            "get": {
                "summary": "A model's input and output JSON Schemas",
                "parameters": [{"name": "model", "in": "query", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_envelope({"type": "object"})), **ERRORS},
            }
        },
        "/client/v4/accounts/{account_id}/ai/finetunes": {
            "post": {
                "summary": "Create a LoRA fine-tune",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/FinetuneCreate"}}},
                },
                "responses": {"200": _json(_envelope({"type": "object"})), **ERRORS},
            },
            "get": {"summary": "List fine-tunes", "responses": {"200": _json(_envelope({"type": "array"})), **ERRORS}},
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
                            }
                        }
                    },
                },
                "responses": {"200": _json(_envelope({"type": "object"})), **ERRORS},
            }
        },
        "/health": {
            "get": {
                "summary": "503 while the model loads, 200 when ready",
                "responses": {"200": _json({"type": "object"}), "503": _json({"type": "object"})},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text/plain exposition"}}}
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}},
        "/": {
            "get": {"summary": "The browser playground", "responses": {"200": {"description": "text/html"}}},
            "post": {
                **binding_run["post"],
                "summary": "The Worker binding's request as Miniflare's remote proxy forwards it (the inner URL in "
                "MF-URL, original headers as MF-Header-*); with API tokens, the connection string is /binding/<token>",
                "parameters": [
                    {"name": "MF-URL", "in": "header", "required": True, "schema": {"type": "string"}},
                    {"name": "MF-Binding", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
            },
        },
        "/ai-api/models/search": {
            "get": {
                "summary": "The served models, as a Worker's env.AI.models() asks for them",
                "responses": {"200": _json(_envelope({"type": "array", "items": {"type": "object"}})), **ERRORS},
            }
        },
    }
    for prefix in OPENAI_PREFIXES:
        paths[f"{prefix}/chat/completions"] = _openai_post(
            "OpenAI-compatible chat completions", "ChatCompletionRequest", "chat.completion"
        )
        paths[f"{prefix}/completions"] = _openai_post(
            "OpenAI-compatible text completions", "CompletionRequest", "text_completion"
        )
        paths[f"{prefix}/models"] = {
            "get": {"summary": "Served models", "responses": {"200": _json({"type": "object"})}}
        }
        paths[f"{prefix}/models/{{model}}"] = {
            "get": {"summary": "One served model", "responses": {"200": _json({"type": "object"}), **OPENAI_ERRORS}}
        }
    for path, item in paths.items():
        params = _path_params(path)
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
                "BindingRun": {
                    "type": "object",
                    "properties": {"inputs": {"$ref": "#/components/schemas/RunInput"}, "options": {"type": "object"}},
                    "required": ["inputs"],
                },
                "RunResult": {k: v for k, v in json_result.items() if k != "contentType"},
                "ChatCompletionRequest": chat,
                "CompletionRequest": completion,
                "FinetuneCreate": finetune,
                "Error": {
                    "type": "object",
                    "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
                    "required": ["code", "message"],
                },
                "ErrorEnvelope": _envelope({"type": "null"}),
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
                        }
                    },
                },
            },
        },
    }
