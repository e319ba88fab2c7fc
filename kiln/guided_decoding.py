"""What a request's output must match: a JSON schema, any JSON object, or a regular expression.

`GuidedDecoding` is built and checked when `SamplingParams` is, and carries the grammar the
runtime compiles for its tokenizer (`kiln.runtime.grammar`). The grammar engine is llguidance,
imported only when a request asks for structured output: kiln runs without it, and such a request
then gets a `RequestError` that says how to install it.

JSON is generated compactly, as ``json.dumps`` writes it (``", "`` and ``": "`` between items, no
other whitespace): a model cannot fill its output with whitespace, and the text stays short.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from kiln.errors import RequestError

GuidedKind = Literal["json", "json_object", "regex"]
# llguidance's JSON options: json.dumps' separators, no free whitespace.
JSON_OPTIONS: dict[str, Any] = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_OBJECT_SCHEMA = '{"type": "object"}'
INSTALL_HINT = "structured output (guided_json, guided_regex, response_format) needs llguidance: pip install llguidance"


def llguidance() -> Any:
    """The llguidance module; a `RequestError` naming the package when it is not installed."""
    try:
        import llguidance as module
    except ImportError as error:
        raise RequestError(INSTALL_HINT) from error
    return module


@dataclass(frozen=True)
class GuidedDecoding:
    """A constraint on the whole output; build it with `json`, `json_object` or `regex`.

    kind: what `spec` is. spec: the schema's JSON text, the regex, or "" for any JSON object.
    grammar: llguidance's grammar for it (checked valid), also the key compiled grammars are cached under.
    """

    kind: GuidedKind
    spec: str
    grammar: str

    @classmethod
    def json(cls, schema: Mapping[str, Any] | str) -> GuidedDecoding:
        """Output must be JSON valid against `schema` (a mapping or its JSON text)."""
        if isinstance(schema, str):
            try:
                parsed = json.loads(schema)
            except json.JSONDecodeError as error:
                raise RequestError(f"guided_json is not valid JSON: {error}") from None
        else:
            parsed = schema
        if not isinstance(parsed, Mapping):
            raise RequestError(f"guided_json must be a JSON schema object, got {type(parsed).__name__}")
        try:
            text = json.dumps(parsed)
        except (TypeError, ValueError) as error:
            raise RequestError(f"guided_json must hold only JSON values: {error}") from None
        grammar = llguidance().LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        return cls("json", text, _checked(grammar, "guided_json is not a JSON schema kiln can enforce"))

    @classmethod
    def json_object(cls) -> GuidedDecoding:
        """Output must be one JSON object, with any properties."""
        grammar = llguidance().LLMatcher.grammar_from_json_schema(ANY_OBJECT_SCHEMA, defaults=JSON_OPTIONS)
        return cls("json_object", "", _checked(grammar, "the JSON object grammar is invalid"))

    @classmethod
    def regex(cls, pattern: str) -> GuidedDecoding:
        """The whole output must match `pattern` (Rust `regex` syntax: no look-around or back-references)."""
        if not isinstance(pattern, str) or not pattern:
            raise RequestError(f"guided_regex must be a non-empty string, got {pattern!r}")
        grammar = llguidance().LLMatcher.grammar_from_regex(pattern)
        return cls("regex", pattern, _checked(grammar, "guided_regex is not a valid regular expression"))

    @classmethod
    def from_fields(cls, guided_json: Any, guided_regex: Any) -> GuidedDecoding | None:
        """The constraint `SamplingParams`' guided_json / guided_regex ask for, or None.

        guided_json: None, True or "object" (any JSON object), a schema mapping or its JSON text.
        """
        if guided_json is not None and guided_regex is not None:
            raise RequestError("give guided_json or guided_regex, not both")
        if guided_regex is not None:
            return cls.regex(guided_regex)
        if guided_json is None:
            return None
        if guided_json is True or guided_json == "object":
            return cls.json_object()
        if isinstance(guided_json, (Mapping, str)):
            return cls.json(guided_json)
        raise RequestError(
            'guided_json must be a JSON schema (a mapping or its JSON text), or true / "object" for any'
            f" JSON object, got {guided_json!r} ({type(guided_json).__name__})"
        )


def _checked(grammar: str, what: str) -> str:
    error = llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise RequestError(f"{what}: {error.strip()}")
    return grammar
