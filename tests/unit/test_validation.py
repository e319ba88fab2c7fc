"""The one check a request passes: each limit has its own clear error, and a good request comes back whole."""

from __future__ import annotations

import pytest

from kiln.errors import RequestError
from kiln.runtime.validation import Request, RequestLimits, validate
from kiln.sampling_params import SamplingParams

LIMITS = RequestLimits(input_len=8, seq_len=12, vocab_size=100)


def test_a_valid_request_is_returned_with_its_parts():
    params = SamplingParams(max_tokens=4)
    ids = [1, 2, 3]
    request = validate(ids, params, LIMITS, mm="images")
    assert request == Request([1, 2, 3], params, "images")
    ids.append(4)  # the request keeps its own copy
    assert request.prompt_ids == [1, 2, 3]


@pytest.mark.parametrize(
    ("ids", "max_tokens", "message"),
    [
        ([], 1, "the prompt is empty"),
        (list(range(9)), 1, r"9 tokens, more than this engine's max_input_len \(8\)"),
        (list(range(8)), 5, r"lower max_tokens to at most 4"),
        ([1, 100, -1, True], 1, r"prompt token ids \[100, -1, True\] are outside the vocabulary \[0, 100\)"),
    ],
)
def test_each_limit_is_a_clear_error(ids, max_tokens, message):
    with pytest.raises(RequestError, match=message):
        validate(ids, SamplingParams(max_tokens=max_tokens), LIMITS)


def test_an_empty_text_prompt_is_refused():
    from kiln.runtime.validation import check_text

    assert check_text(" ") == " "
    with pytest.raises(RequestError, match="the prompt is empty"):
        check_text("")


def test_the_engine_takes_one_completion_per_request():
    params = SamplingParams(max_tokens=2, n=3, seed=1)
    with pytest.raises(RequestError, match=r"n=3: .*choices\(\)"):
        validate([1, 2], params, LIMITS)
    assert [validate([1, 2], choice, LIMITS).params.seed for choice in params.choices()] == [1, 2, 3]
