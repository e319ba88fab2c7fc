"""The server's OpenAPI document: errors in OpenAI's shape, the served model's name, and the ranges
`SamplingParams` and the engine's limits enforce.

Only the document changes; requests are still validated by the pydantic bodies in `protocol.py`,
`SamplingParams` and the engine, so a value outside a documented range is still a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from kiln import sampling_params as sp
from kiln.runtime.validation import RequestLimits


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal and failure: a 4xx for a request kiln will not run, a 5xx for one it could not."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


# Declared on every /v1 route; "4XX" also stands in for FastAPI's default 422 (kiln answers 400).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused: invalid body, unknown model or option, wrong key"},
    "5XX": {"model": ErrorResponse, "description": "The engine failed or the server is stopping"},
}

_BODIES = ("CompletionRequest", "ChatCompletionRequest")

Constraints = dict[str, dict[str, Any]]  # JSON type ("number" covers "integer") -> JSON-schema keywords


def _field_ranges(limits: RequestLimits) -> dict[str, Constraints]:
    """What each body field accepts, as JSON-schema keywords per JSON type of its value."""
    openai_penalty = {"number": {"minimum": -sp.MAX_ABS_OPENAI_PENALTY, "maximum": sp.MAX_ABS_OPENAI_PENALTY}}
    token_count = {"number": {"minimum": 1, "maximum": limits.seq_len - 1}}
    top = {"number": {"minimum": 0, "maximum": sp.MAX_LOGPROBS}}
    return {
        "temperature": {"number": {"minimum": 0, "maximum": sp.MAX_TEMPERATURE}},
        "top_p": {"number": {"exclusiveMinimum": 0, "maximum": 1}},
        "top_k": {"number": {"minimum": -1}},
        "min_p": {"number": {"minimum": 0, "maximum": 1}},
        "repetition_penalty": {"number": {"minimum": sp.MIN_REPETITION_PENALTY, "maximum": sp.MAX_REPETITION_PENALTY}},
        "presence_penalty": openai_penalty,
        "frequency_penalty": openai_penalty,
        "seed": {"number": {"minimum": 0, "maximum": sp.MAX_SEED}},  # choice i uses seed + i mod 2**64
        "stop": {"string": {"minLength": 1}, "array": {"maxItems": sp.MAX_STOP_STRINGS}},
        "stop_token_ids": {"number": {"minimum": 0}},
        "max_tokens": token_count,
        "max_completion_tokens": token_count,
        "logprobs": top,  # completions only; chat's logprobs is a boolean and has no number in it
        "top_logprobs": top,
        # token id (digits) -> bias; pydantic's additionalProperties carry the number range
        "logit_bias": {
            "object": {"maxProperties": sp.MAX_LOGIT_BIAS_ENTRIES, "propertyNames": {"pattern": "^[0-9]{1,9}$"}},
            "number": {"minimum": -sp.MAX_ABS_LOGIT_BIAS, "maximum": sp.MAX_ABS_LOGIT_BIAS},
        },
        "guided_regex": {"string": {"minLength": 1}},
        "prompt": {
            "string": {"minLength": 1},
            "array": {"minItems": 1},
            "number": {"minimum": 0, "maximum": limits.vocab_size - 1},
        },
        # OpenAI options kiln refuses unless left at their "off" value
        "echo": {"boolean": {"enum": [False]}},
        "suffix": {"string": {"maxLength": 0}},
        "tools": {"array": {"maxItems": 0}},
    }


_UNSUPPORTED = "kiln does not support it: leave it out"
# Options whose only accepted values are "off": their whole schema is replaced.
_OFF_ONLY: dict[str, dict[str, Any]] = {
    "tool_choice": {"enum": [None, "none"], "description": _UNSUPPORTED},
}


def _constrain(node: Any, constraints: Constraints) -> None:
    """Add `constraints` to every schema node in `node` (its anyOf branches and items too) by JSON type."""
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    keywords = constraints.get("number" if kind == "integer" else str(kind))
    if keywords:
        node.update(keywords)
    for branch in node.get("anyOf", []):
        _constrain(branch, constraints)
    _constrain(node.get("items"), constraints)
    _constrain(node.get("additionalProperties"), constraints)


def _drop_image_parts(schema: dict[str, Any]) -> None:
    """A text-only engine refuses image parts: message content lists hold text parts only."""
    content = schema["components"]["schemas"]["ChatMessage"]["properties"]["content"]
    for branch in content["anyOf"]:
        if branch.get("type") == "array":
            branch["items"] = {"$ref": "#/components/schemas/TextPart"}


def _drop_video_parts(schema: dict[str, Any]) -> None:
    """An engine without video input refuses video parts: message content lists hold text and image parts."""
    content = schema["components"]["schemas"]["ChatMessage"]["properties"]["content"]
    for branch in content["anyOf"]:
        parts = branch.get("items", {}).get("anyOf") if branch.get("type") == "array" else None
        if parts is not None:
            branch["items"]["anyOf"] = [p for p in parts if not p.get("$ref", "").endswith("/VideoPart")]


def describe_limits(
    app: FastAPI, model_name: str, limits: RequestLimits, *, takes_images: bool, takes_videos: bool = False
) -> None:
    """Make `app.openapi()` name `model_name` as the only model and document the accepted values."""
    ranges = _field_ranges(limits)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for name in _BODIES:
                fields = schema["components"]["schemas"][name]["properties"]
                fields["model"]["enum"] = [model_name]
                fields["model"]["description"] = "The served model (GET /v1/models); any other name is a 404"
                for field, constraints in ranges.items():
                    _constrain(fields.get(field), constraints)
                for field, off in _OFF_ONLY.items():
                    if field in fields:
                        fields[field] = {"title": fields[field].get("title", field), **off}
            if not takes_images:
                _drop_image_parts(schema)
            elif not takes_videos:
                _drop_video_parts(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
