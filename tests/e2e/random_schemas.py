"""Seeded random JSON schemas whose every valid document is short, so that a grammar always completes.

Objects have 1-4 properties of the kinds string, integer, number, boolean, enum, array and nested
object (two levels at most), a random `required` list and no extra properties; strings have a
`maxLength`, arrays a `maxItems` and scalar items, integers and numbers a range. The longest
document stays far below 200 tokens of the demo tokenizer, except for a number's digits, which only
a model that never picks anything else could run on with.
"""

from __future__ import annotations

import random
from typing import Any

NAMES = ["name", "age", "city", "score", "tags", "ok", "kind", "size", "note", "id", "level", "color", "items"]
WORDS = ["red", "green", "blue", "clay", "kiln", "glaze", "fire", "stone", "pot"]
SCALARS = ["string", "integer", "number", "boolean", "enum"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(NAMES, rng.randint(1, 4 if depth == 0 else 3))
    properties = {name: _value(rng, depth) for name in names}
    required = sorted(rng.sample(names, rng.randint(0, len(names))), key=names.index)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = SCALARS + ["array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "array":
        return {"type": "array", "items": _scalar(rng, rng.choice(SCALARS)), "maxItems": rng.randint(1, 3)}
    if kind == "object":
        return random_schema(rng, depth + 1)
    return _scalar(rng, kind)


def _scalar(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(1, 10)}
        if rng.random() < 0.3:
            schema["minLength"] = 1
        return schema
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 1000}
    if kind == "boolean":
        return {"type": "boolean"}
    options: list[Any] = rng.sample(WORDS, rng.randint(1, 4))
    if rng.random() < 0.3:
        options.append(rng.randint(0, 9))
    return {"enum": options}
