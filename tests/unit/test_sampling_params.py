"""SamplingParams: defaults, normalisation, every validation error, from_dict."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from kiln.errors import KilnError, RequestError
from kiln.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_k == 0
    assert p.top_p == 1.0
    assert p.min_p == 0.0
    assert p.repetition_penalty == 1.0
    assert p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.seed is None
    assert p.stop == ()
    assert p.stop_token_ids == ()
    assert p.ignore_eos is False
    assert p.logprobs is None
    assert p.skip_special_tokens is True
    assert p.greedy is False


def test_frozen_and_keyword_only() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(32)  # type: ignore[misc]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_valid_values_are_kept() -> None:
    p = SamplingParams(
        max_tokens=1,
        temperature=100,
        top_k=-1,
        top_p=0.01,
        min_p=1.0,
        repetition_penalty=10,
        presence_penalty=-2,
        frequency_penalty=2,
        seed=2**64 - 1,
        stop=["a", "bc"],
        stop_token_ids=[0, 7],
        ignore_eos=True,
        logprobs=20,
        skip_special_tokens=False,
    )
    assert p.temperature == 100.0 and isinstance(p.temperature, float)
    assert isinstance(p.repetition_penalty, float) and isinstance(p.presence_penalty, float)
    assert p.stop == ("a", "bc")
    assert p.stop_token_ids == (0, 7)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams().prompt_logprobs is None
    assert SamplingParams(seed=0).seed == 0
    assert SamplingParams(top_k=0).top_k == 0


def test_stop_normalisation() -> None:
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["x", "y"]).stop == ("x", "y")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop=["s"] * 16).stop == ("s",) * 16
    # Normalised values hash and compare like tuples.
    assert SamplingParams(stop="a") == SamplingParams(stop=("a",))
    hash(SamplingParams(stop=["a"], stop_token_ids=[1]))


BAD_VALUES = [
    # (field, value, text the message must contain besides the field name)
    ("max_tokens", 0, ">= 1"),
    ("max_tokens", -5, ">= 1"),
    ("max_tokens", 1.5, "integer"),
    ("max_tokens", True, "integer"),
    ("max_tokens", "16", "integer"),
    ("temperature", -0.1, "[0, 100]"),
    ("temperature", 100.5, "[0, 100]"),
    ("temperature", math.nan, "finite"),
    ("temperature", math.inf, "finite"),
    ("temperature", -math.inf, "finite"),
    ("temperature", 1e-9, "greedy"),
    ("temperature", True, "number"),
    ("temperature", None, "number"),
    ("temperature", "0.5", "number"),
    ("top_k", -2, ">= -1"),
    ("top_k", 2.0, "integer"),
    ("top_k", False, "integer"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", -0.5, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_p", math.nan, "finite"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("min_p", math.inf, "finite"),
    ("repetition_penalty", 0.0, "[0.1, 10]"),
    ("repetition_penalty", -1.0, "[0.1, 10]"),
    ("repetition_penalty", 1.9e-86, "[0.1, 10]"),
    ("repetition_penalty", 0.09, "[0.1, 10]"),
    ("repetition_penalty", 10.5, "[0.1, 10]"),
    ("repetition_penalty", math.nan, "finite"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("presence_penalty", math.inf, "finite"),
    ("frequency_penalty", -3, "[-2, 2]"),
    ("frequency_penalty", 2.0001, "[-2, 2]"),
    ("frequency_penalty", "1", "number"),
    ("seed", -1, "2**64"),
    ("seed", 2**64, "2**64"),
    ("seed", 1.0, "integer"),
    ("seed", True, "integer"),
    ("stop", "", "stop[0]"),
    ("stop", ["ok", ""], "stop[1]"),
    ("stop", ["ok", 3], "stop[1]"),
    ("stop", ["s"] * 17, "at most 16"),
    ("stop", 5, "string or a list"),
    ("stop", {"a"}, "string or a list"),
    ("stop_token_ids", [1, -1], "stop_token_ids[1]"),
    ("stop_token_ids", [1, 2.0], "stop_token_ids[1]"),
    ("stop_token_ids", [True], "stop_token_ids[0]"),
    ("stop_token_ids", 5, "list of integers"),
    ("stop_token_ids", "12", "list of integers"),
    ("ignore_eos", 1, "true or false"),
    ("ignore_eos", "yes", "true or false"),
    ("logprobs", -1, "[0, 20]"),
    ("logprobs", 21, "[0, 20]"),
    ("logprobs", 1.0, "integer"),
    ("logprobs", True, "integer"),
    ("prompt_logprobs", -1, "[0, 20]"),
    ("prompt_logprobs", 21, "[0, 20]"),
    ("prompt_logprobs", True, "integer"),
    ("skip_special_tokens", 0, "true or false"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_VALUES])
def test_invalid_value_raises_request_error(field: str, value: object, allowed: str) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message
    assert allowed in message
    assert isinstance(info.value, KilnError)


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("temperature", -0.1, "-0.1"),
        ("top_p", 1.01, "1.01"),
        ("top_k", -2, "-2"),
        ("repetition_penalty", 10.5, "10.5"),
        ("max_tokens", 0, "0"),
        ("logprobs", 21, "21"),
        ("stop_token_ids", [1, -7], "-7"),
        ("temperature", math.nan, "nan"),
    ],
)
def test_message_shows_the_bad_value(field: str, value: object, shown: str) -> None:
    with pytest.raises(RequestError, match="got") as info:
        SamplingParams(**{field: value})
    assert shown in str(info.value)


def test_from_dict_builds_and_normalises() -> None:
    p = SamplingParams.from_dict({"temperature": 0, "stop": "END", "max_tokens": 3, "stop_token_ids": [9]})
    assert p == SamplingParams(temperature=0.0, stop=("END",), max_tokens=3, stop_token_ids=(9,))
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_rejects_unknown_keys_listing_them_and_valid_names() -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams.from_dict({"temprature": 0.5, "top_p": 0.9, "max_new_tokens": 4})
    message = str(info.value)
    assert "'temprature'" in message and "'max_new_tokens'" in message
    assert "'top_p'" not in message.split(";")[0]  # a valid key is not reported as unknown
    for name in ("max_tokens", "temperature", "top_k", "top_p", "stop_token_ids", "skip_special_tokens"):
        assert name in message.split("valid names are:")[1]


def test_from_dict_validates_values_and_type() -> None:
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0})
    with pytest.raises(RequestError, match="mapping"):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="unknown"):
        SamplingParams.from_dict({1: 0.5})  # type: ignore[dict-item]


def test_field_names_match_dataclass_fields() -> None:
    assert SamplingParams.FIELD_NAMES == tuple(f.name for f in dataclasses.fields(SamplingParams))
    assert len(SamplingParams.FIELD_NAMES) == 20


def test_token_ids_only_allows_no_stop_strings() -> None:
    assert SamplingParams(detokenize=False, stop_token_ids=(3,)).detokenize is False
    with pytest.raises(RequestError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["end"])
    with pytest.raises(RequestError, match="detokenize"):
        SamplingParams(detokenize="no")  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [(0, "[1, 32]"), (33, "[1, 32]"), (True, "integer"), (2.0, "integer")])
def test_n_is_a_count_of_completions_up_to_32(value, expected) -> None:
    with pytest.raises(RequestError, match=rf"n must be .*{re.escape(expected)}"):
        SamplingParams(n=value)


def test_choices_are_n_requests_seeded_one_apart() -> None:
    one = SamplingParams(seed=7)
    assert one.choices() == [one]
    seeded = SamplingParams(n=3, seed=7, temperature=0.5, max_tokens=4)
    assert [c.seed for c in seeded.choices()] == [7, 8, 9]
    assert all(c == dataclasses.replace(seeded, n=1, seed=c.seed) for c in seeded.choices())
    assert [c.seed for c in SamplingParams(n=2, seed=2**64 - 1).choices()] == [2**64 - 1, 0]  # wraps, stays valid
    assert [c.seed for c in SamplingParams(n=2).choices()] == [None, None]  # unseeded: the global RNG
