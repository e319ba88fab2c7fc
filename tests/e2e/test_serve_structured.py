"""Structured output, logit_bias and the fields that change nothing, through the official `openai` client."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import pytest
from e2e_helpers import ServerProcess
from pydantic import BaseModel, Field

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

MODEL = "demo"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "glazed": {"type": "boolean"},
    },
    "required": ["name", "age", "glazed"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a pot as JSON."}]


class Pot(BaseModel):
    maker: str = Field(max_length=8)
    kind: Literal["bowl", "vase", "cup"]
    fired: bool


@pytest.fixture(scope="module")
def server(demo_engine):
    proc = ServerProcess(demo_engine, "--served-model-name", MODEL)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_json_schema_with_strict(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pot", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=fmt, temperature=1.0, seed=3, n=3, max_tokens=120
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_chat_parse_with_a_pydantic_model(client) -> None:
    reply = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Pot, temperature=1.0, seed=5, max_tokens=120
    )
    pot = reply.choices[0].message.parsed
    assert isinstance(pot, Pot) and len(pot.maker) <= 8


def test_chat_streams_under_a_schema_and_text_format_changes_nothing(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "pot", "schema": SCHEMA}},
        temperature=1.0,
        seed=1,
        max_tokens=120,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    text_format = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "text"}, temperature=0.0, max_tokens=8
    )
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.0, max_tokens=8)
    assert text_format.choices[0].message.content == plain.choices[0].message.content


def test_chat_json_object(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format={"type": "json_object"}, temperature=1.0, seed=0, max_tokens=30
    )
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":  # any object may be longer than max_tokens
        assert isinstance(json.loads(choice.message.content), dict)


def test_completions_response_format_and_vllm_fields(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pot", "schema": SCHEMA}}
    reply = client.completions.create(
        model=MODEL, prompt="A pot:", max_tokens=120, temperature=1.0, seed=2, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)
    reply = client.completions.create(
        model=MODEL, prompt="A pot:", max_tokens=120, temperature=1.0, seed=2, extra_body={"guided_json": SCHEMA}
    )
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)
    reply = client.completions.create(
        model=MODEL, prompt="A pot:", max_tokens=20, temperature=1.0, extra_body={"guided_regex": "(bowl|cup)-[0-9]{3}"}
    )
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text[-4] == "-"


def test_log_probs_of_tokens_a_grammar_forbids_are_valid_json(client) -> None:
    """A regex that leaves one token allowed: the other top alternatives have probability 0 (-inf, which
    JSON cannot carry); they are reported at OpenAI's floor, -9999.0 (the fuzz test found the 500)."""
    reply = client.completions.create(
        model=MODEL, prompt="0", max_tokens=4, logprobs=2, extra_body={"guided_regex": "0"}
    )
    choice = reply.choices[0]
    assert choice.text == "0" and choice.finish_reason == "stop"
    assert choice.logprobs is not None and choice.logprobs.top_logprobs
    first = choice.logprobs.top_logprobs[0]
    assert first["0"] == 0.0 and len(first) == 2 and sorted(first.values())[0] == -9999.0
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "0"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body={"guided_regex": "0"},
    )
    assert chat.choices[0].logprobs is not None
    top = chat.choices[0].logprobs.content[0].top_logprobs
    assert [t.logprob for t in top] == [0.0, -9999.0]


def test_logit_bias_with_string_keys(client, server) -> None:
    bang = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": "!", "add_special_tokens": False})
    token = bang.json()["tokens"][-1]
    reply = client.completions.create(
        model=MODEL, prompt="A kiln is", max_tokens=4, temperature=1.0, logit_bias={str(token): 100}
    )
    assert reply.choices[0].text == "!!!!"
    with pytest.raises(openai.BadRequestError, match=r"logit_bias\[.*\] must be in \[-100, 100\]"):
        client.completions.create(model=MODEL, prompt="A kiln is", max_tokens=4, logit_bias={str(token): 101})
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt="A kiln is", max_tokens=4, logit_bias={"99999": 1})


def test_fields_that_change_nothing_are_accepted_and_logged(client, server) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0.0,
        store=False,
        metadata={"team": "pottery"},
        parallel_tool_calls=False,
        user="someone",
        service_tier="auto",
    )
    assert reply.choices[0].message.content
    logged = [line for line in server.output().splitlines() if "accepted and ignored" in line]
    assert logged and logged[-1].endswith("store, metadata, parallel_tool_calls, user, service_tier")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
            "strng",
        ),
        ({"guided_regex": "[a-"}, "guided_regex is not a valid regular expression"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "not both"),
        ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "not both"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "kiln does not support tools"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)
def test_refusals_name_the_field(client, extra, words) -> None:
    with pytest.raises(openai.BadRequestError, match=words):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=extra)
