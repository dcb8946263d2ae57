"""The request bodies of the OpenAI routes as JSON Schema, for the app's /openapi.json.

The routes read their bodies themselves (protocol.py validates every field and answers
400 naming it), so FastAPI does not know their shape; these schemas tell clients and API
fuzzers what a request looks like. They describe what is accepted, not every check: ranges
that depend on the server (max_tokens up to serve.max_tokens_limit) are checked per request.
"""

from __future__ import annotations

from typing import Any

_SAMPLING: dict[str, Any] = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    "no_repeat_ngram_size": {"type": "integer", "minimum": 0, "maximum": 64},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1},
                        "maxItems": 4}]},
    "n": {"type": "integer", "enum": [1]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object",
                       "properties": {"include_usage": {"type": "boolean"}}},
}

_MODEL = {"type": "string", "minLength": 1, "examples": ["base"],
          "description": "a model id from GET /v1/models"}

_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"type": "string", "enum": ["text"]},
                             "text": {"type": "string"}}}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["role", "content"],
                "properties": {
                    "role": {"type": "string",
                             "enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {"oneOf": [{"type": "string"},
                                          {"type": "array", "items": _TEXT_PART}]},
                },
            },
            "examples": [[{"role": "user", "content": "Hello"}]],
        },
        **_SAMPLING,
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": _MODEL,
        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "items": {"type": "string", "minLength": 1},
                              "minItems": 1, "maxItems": 1}],
                   "examples": ["Once upon a time"]},
        **_SAMPLING,
    },
}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's `openapi_extra` for a route whose JSON body follows `schema`."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}
