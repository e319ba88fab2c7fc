"""Structured output and logit_bias on the demo engine, through LLM.generate (the server's side: test_serve_structured).

The demo model samples at temperature 1 among the tokens its grammar allows; every output must
parse and validate, and end ("stop") because the grammar completed, within max_tokens.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from e2e_helpers import SHARED_GPU
from random_schemas import random_schema

from kiln import LLM, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PROMPT = "A kiln is"
SCHEMAS = 50
MAX_TOKENS = 400  # the longest output of the 50 schemas is about 100 tokens


@pytest.fixture(scope="module")
def llm(demo_engine) -> LLM:
    return LLM(demo_engine, **SHARED_GPU)


def test_fifty_random_schemas_at_temperature_one_give_valid_json(llm: LLM) -> None:
    rng = random.Random(16)
    schemas = [random_schema(rng) for _ in range(SCHEMAS)]
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, guided_json=schema)
        for i, schema in enumerate(schemas)
    ]
    outputs = llm.generate([PROMPT] * SCHEMAS, params)
    eos = llm.engine.eos_ids
    for schema, out in zip(schemas, outputs, strict=True):
        assert out.finish_reason == "stop", (out.finish_reason, out.text, schema)
        assert not eos & set(out.token_ids)  # it ended because the grammar completed, not on EOS
        jsonschema.validate(json.loads(out.text), schema)
    # Nested objects, arrays and every scalar kind were generated, not just empty objects.
    texts = [o.text for o in outputs]
    assert sum(len(json.loads(t)) for t in texts) > SCHEMAS
    assert (
        any("[" in t for t in texts)
        and any(": {" in t for t in texts)
        and any("true" in t or "false" in t for t in texts)
    )


def test_regex_output_matches_in_full(llm: LLM) -> None:
    pattern = r"(red|green|blue)-[0-9]{2,4}( [a-z]{1,6}){0,2}"
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, guided_regex=pattern) for s in range(8)]
    outputs = llm.generate([PROMPT] * 8, params)
    for out in outputs:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), (out.finish_reason, out.text)
    assert len({o.text for o in outputs}) > 1


def test_json_object_output_is_one_object(llm: LLM) -> None:
    # Any object has no bound on its length (the demo model likes to write prose into a key):
    # outputs that end must be objects, and some must end.
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=s, guided_json=True) for s in range(6)]
    outputs = llm.generate([PROMPT] * 6, params)
    ended = [o for o in outputs if o.finish_reason == "stop"]
    assert len(ended) >= 3, [o.text for o in outputs]
    for out in ended:
        assert isinstance(json.loads(out.text), dict), out.text
    for out in outputs:
        assert out.text.startswith("{")


def test_logit_bias_forces_and_bans_tokens(llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    plain = llm.generate(PROMPT, greedy)[0]
    forced_id = llm.encode("!")[-1]
    forced = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=1.0, seed=0, logit_bias={forced_id: 100}))[0]
    assert forced.token_ids == [forced_id] * 5
    banned_id = plain.token_ids[0]
    banned = llm.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, logit_bias={banned_id: -100}))[0]
    assert banned_id not in banned.token_ids and banned.token_ids[0] != plain.token_ids[0]


def test_constrained_and_plain_rows_share_a_batch_and_pipelining_falls_back(demo_engine, llm: LLM) -> None:
    number = {"type": "integer", "minimum": 0, "maximum": 99}  # greedy, an unbounded integer never ends
    schema = {"type": "object", "properties": {"n": number}, "required": ["n"], "additionalProperties": False}
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    guided = SamplingParams(max_tokens=24, temperature=0.0, guided_json=schema)
    alone = llm.generate(PROMPT, plain)[0].token_ids
    mixed = llm.generate([PROMPT, PROMPT, PROMPT], [plain, guided, plain])
    assert mixed[0].token_ids == mixed[2].token_ids == alone  # the mask touched only its own row
    assert json.loads(mixed[1].text).keys() == {"n"}
    pipelined = LLM(demo_engine, overlap_decode=True, **SHARED_GPU)
    again = pipelined.generate([PROMPT, PROMPT, PROMPT], [plain, guided, plain])
    assert [o.token_ids for o in again] == [o.token_ids for o in mixed]
