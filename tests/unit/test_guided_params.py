"""SamplingParams' guided_json, guided_regex and logit_bias: what is accepted, how it is stored, what is refused."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from kiln.errors import RequestError
from kiln.guided_decoding import INSTALL_HINT, GuidedDecoding
from kiln.sampling_params import SamplingParams

pytest.importorskip("llguidance")
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_guided_json_takes_a_mapping_or_its_text_and_stores_the_text() -> None:
    from_mapping = SamplingParams(guided_json=SCHEMA)
    from_text = SamplingParams(guided_json=json.dumps(SCHEMA))
    assert from_mapping.guided_json == from_text.guided_json == json.dumps(SCHEMA)
    assert from_mapping.guided == from_text.guided
    guided = from_mapping.guided
    assert isinstance(guided, GuidedDecoding) and guided.kind == "json" and json.loads(guided.spec) == SCHEMA
    assert dataclasses.replace(from_mapping, max_tokens=3).guided == guided  # derived again on copy
    assert SamplingParams().guided is None


@pytest.mark.parametrize("value", [True, "object"])
def test_guided_json_true_or_object_means_any_json_object(value: object) -> None:
    guided = SamplingParams(guided_json=value).guided
    assert guided is not None and guided.kind == "json_object"


def test_guided_regex() -> None:
    guided = SamplingParams(guided_regex=r"\d{3}-[a-z]+").guided
    assert guided is not None and guided.kind == "regex" and guided.spec == r"\d{3}-[a-z]+"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guided_json": {"type": "strng"}}, "guided_json is not a JSON schema kiln can enforce: .*strng"),
        ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
        ({"guided_json": "[1, 2]"}, "guided_json must be a JSON schema object, got list"),
        ({"guided_json": 3}, "guided_json must be a JSON schema"),
        ({"guided_json": {"type": "string", "pattern": "[a-"}}, "not a JSON schema kiln can enforce: .*regex"),
        ({"guided_regex": "[a-"}, "guided_regex is not a valid regular expression"),
        ({"guided_regex": ""}, "guided_regex must be a non-empty string"),
        ({"guided_regex": 5}, "guided_regex must be a non-empty string"),
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "give guided_json or guided_regex, not both"),
    ],
)
def test_bad_constraints_are_refused_with_the_reason(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**fields)  # type: ignore[arg-type]


def test_logit_bias_is_stored_as_int_ids_to_floats() -> None:
    assert SamplingParams(logit_bias={"12": 3, 7: -100, 0: 100.0}).logit_bias == {12: 3.0, 7: -100.0, 0: 100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert SamplingParams.from_dict({"logit_bias": {"5": 1}}).logit_bias == {5: 1.0}


@pytest.mark.parametrize(
    ("bias", "message"),
    [
        ({1: 100.5}, r"logit_bias\[1\] must be in \[-100, 100\]"),
        ({1: -101}, r"must be in \[-100, 100\]"),
        ({1: float("nan")}, "finite"),
        ({1: "high"}, "must be a number"),
        ({1: True}, "must be a number"),
        ({"x": 1}, "logit_bias keys must be token ids"),
        ({-1: 1}, "logit_bias keys must be token ids"),
        ({"-1": 1}, "logit_bias keys must be token ids"),
        ([1, 2], "logit_bias must map token ids to biases"),
        ({i: 1 for i in range(301)}, "at most 300 entries"),
    ],
)
def test_bad_logit_bias_is_refused(bias: object, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(logit_bias=bias)  # type: ignore[arg-type]


def test_without_llguidance_structured_output_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(RequestError, match="pip install llguidance") as info:
        SamplingParams(guided_json=SCHEMA)
    assert str(info.value) == INSTALL_HINT
    assert SamplingParams(logit_bias={1: 2}).logit_bias == {1: 2.0}  # everything else works without it


def test_kiln_imports_llguidance_only_when_asked() -> None:
    import subprocess

    code = (
        "import sys; import kiln.api, kiln.runtime.engine, kiln.serve.app, kiln.cli;"
        " from kiln import SamplingParams; SamplingParams(logit_bias={1: 1});"
        " assert 'llguidance' not in sys.modules, 'llguidance imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
