"""The one check a request passes before an engine takes it: prompt length, total length, token ids.

`validate` is called once per request, by whoever receives it (`LLM.generate` before any prompt runs,
the server before a response starts); it returns a `Request`, which is what `Engine.add_request`
takes, so nothing downstream checks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.errors import RequestError
from kiln.sampling_params import SamplingParams

EMPTY_TEXT = "the prompt is empty: give some text or at least one token id"


def check_text(text: str) -> str:
    """A text prompt, refused when empty (its only tokens would be the tokenizer's own, such as a BOS)."""
    if not text:
        raise RequestError(EMPTY_TEXT)
    return text


@dataclass(frozen=True)
class RequestLimits:
    """An engine's limits on what a request may ask for (fixed at build time)."""

    input_len: int  # max_input_len: prompt tokens
    seq_len: int  # max_seq_len: prompt + generated tokens
    vocab_size: int


@dataclass(frozen=True)
class Request:
    """A request that passed `validate` (build it only through `validate`)."""

    prompt_ids: list[int]
    params: SamplingParams
    mm: Any = None  # kiln.runtime.multimodal.MultimodalData of a prompt with images


def validate(prompt_ids: list[int], params: SamplingParams, limits: RequestLimits, mm: Any = None) -> Request:
    """The request, checked against `limits`; a RequestError says what is wrong and how to fix it."""
    if not prompt_ids:
        raise RequestError("the prompt is empty: give at least one token")
    if len(prompt_ids) > limits.input_len:
        raise RequestError(
            f"the prompt has {len(prompt_ids)} tokens, more than this engine's max_input_len "
            f"({limits.input_len}); shorten it or rebuild with a larger --max-input-len"
        )
    if len(prompt_ids) + params.max_tokens > limits.seq_len:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this engine's "
            f"max_seq_len ({limits.seq_len}); lower max_tokens to at most {limits.seq_len - len(prompt_ids)}"
        )
    if params.n != 1:  # never silently one completion of n
        raise RequestError(
            f"n={params.n}: the engine runs one completion per request; LLM.generate and the server "
            "give each of SamplingParams.choices() its own"
        )
    vocab = limits.vocab_size
    bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    biased = sorted(t for t in params.logit_bias or () if t >= vocab)
    if biased:
        raise RequestError(f"logit_bias token ids {biased[:5]} are outside the vocabulary [0, {vocab})")
    return Request(list(prompt_ids), params, mm)
