"""`kiln run` reports request errors in the words of its command line."""

from __future__ import annotations

import pytest

from kiln.errors import KilnError
from kiln.run_prompts import as_flags, sampling_params


def test_fields_become_flags_and_other_words_stay():
    message = "prompt (5 tokens) + max_tokens (600) exceeds max_seq_len (512); lower max_tokens to at most 507"
    assert as_flags(message) == (
        "prompt (5 tokens) + --max-new-tokens (600) exceeds max_seq_len (512); lower --max-new-tokens to at most 507"
    )
    assert as_flags("stop_token_ids must be a list") == "--stop-token-id must be a list"
    assert as_flags("--max-input-len and max_input_len") == "--max-input-len and max_input_len"


def test_bad_sampling_value_names_the_flag():
    with pytest.raises(KilnError, match=r"^--top-k must"):
        sampling_params(top_k=-3)
