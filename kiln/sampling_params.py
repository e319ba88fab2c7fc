"""Per-request sampling settings, validated once when the request arrives.

A `SamplingParams` that exists is valid: every field is checked in
`__post_init__`, and a bad value raises `RequestError` naming the field, the
value it got and what it accepts. The runtime (`kiln.runtime.sampler`) relies
on that and does no validation of its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from kiln.errors import RequestError
from kiln.guided_decoding import GuidedDecoding

MAX_TEMPERATURE = 100.0
# Dividing float32 logits by a temperature below this can overflow to inf; use 0 for greedy.
MIN_POSITIVE_TEMPERATURE = 1e-5
MAX_REPETITION_PENALTY = 10.0
# A penalty near 0 divides a logit into inf (and the sampler's probabilities into nan).
MIN_REPETITION_PENALTY = 1.0 / MAX_REPETITION_PENALTY
MAX_ABS_OPENAI_PENALTY = 2.0
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_SEED = 2**64 - 1
MAX_N = 32
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 300


def _is_int(value: object) -> bool:
    """True for a real integer; `bool` is an `int` subclass but never a valid count or id."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int, high: int | None, allowed: str) -> int:
    if not _is_int(value):
        raise RequestError(f"{name} must be an integer {allowed}, got {value!r} ({type(value).__name__})")
    assert isinstance(value, int)
    if value < low or (high is not None and value > high):
        raise RequestError(f"{name} must be {allowed}, got {value}")
    return value


def _check_float(name: str, value: object, allowed: str) -> float:
    """Accept an int or float (not bool), reject NaN and infinities, return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number {allowed}, got {value!r}")
    return number


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    Fields:
        max_tokens: most tokens to generate, >= 1.
        temperature: 0 means greedy (argmax); otherwise in [1e-05, 100].
        top_k: keep the k most likely tokens; 0 or -1 disables it.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability
            reaches top_p; in (0, 1], 1 disables it.
        min_p: drop tokens whose probability is below min_p times the top token's; in [0, 1].
        repetition_penalty: Hugging Face rule, applied to every token id in the prompt or
            the output so far: a positive logit is divided by it, a negative one multiplied;
            in [0.1, 10], 1 disables it.
        presence_penalty: OpenAI rule over generated tokens only: subtracted once from the
            logit of every token generated at least once; in [-2, 2].
        frequency_penalty: OpenAI rule over generated tokens only: subtracted from a token's
            logit once per time it was generated; in [-2, 2].
        seed: makes sampling reproducible for this request; None uses the global RNG.
        stop: strings that end generation; the matched string is not part of the output.
            A single string or a list is accepted and stored as a tuple (at most 16, non-empty).
        stop_token_ids: token ids that end generation (besides EOS).
        ignore_eos: keep generating past the EOS token (until max_tokens or a stop).
        logprobs: return the sampled token's log-prob and this many top alternatives (0..20);
            None returns none.
        prompt_logprobs: return each prompt token's log-prob and this many top alternatives (0..20),
            the first token's None (it has no context); None returns none. Such a request does not
            take cached prefix blocks: its whole prompt is computed.
        skip_special_tokens: leave special tokens out of the decoded text.
        detokenize: produce text; False returns token ids only (benchmarks), and allows no stop strings.
        n: completions per prompt (1..32), each a request of its own (`choices()`): with a seed,
            choice i samples from seed + i; greedy choices are identical copies.
        guided_json: the output must be JSON valid against this schema (a mapping or its JSON text;
            stored as the JSON text), or any JSON object for True or "object". The request ends
            ("stop") when the JSON is complete. Needs the llguidance package.
        guided_regex: the whole output must match this regular expression (Rust `regex` syntax);
            not with guided_json. Needs the llguidance package.
        logit_bias: token id -> a bias in [-100, 100] added to its logit before sampling (OpenAI's
            rule: -100 in effect bans the token, 100 all but forces it); at most 300 entries.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    n: int = 1
    guided_json: Any = None
    guided_regex: str | None = None
    logit_bias: Mapping[int, float] | None = None

    FIELD_NAMES: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1, None, ">= 1")

        temperature = _check_float("temperature", self.temperature, "in [0, 100] (0 = greedy)")
        if temperature < 0.0 or temperature > MAX_TEMPERATURE:
            raise RequestError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {temperature!r}")
        if 0.0 < temperature < MIN_POSITIVE_TEMPERATURE:
            raise RequestError(
                f"temperature must be 0 (greedy) or in [{MIN_POSITIVE_TEMPERATURE:g}, {MAX_TEMPERATURE:g}],"
                f" got {temperature!r}; use temperature=0 for greedy decoding"
            )
        object.__setattr__(self, "temperature", temperature)

        _check_int("top_k", self.top_k, -1, None, ">= -1 (0 or -1 = disabled)")

        top_p = _check_float("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1] (1 = disabled), got {top_p!r}")
        object.__setattr__(self, "top_p", top_p)

        min_p = _check_float("min_p", self.min_p, "in [0, 1]")
        if not 0.0 <= min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1] (0 = disabled), got {min_p!r}")
        object.__setattr__(self, "min_p", min_p)

        repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty, "in [0.1, 10]")
        if not MIN_REPETITION_PENALTY <= repetition_penalty <= MAX_REPETITION_PENALTY:
            raise RequestError(
                f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}]"
                f" (1 = disabled), got {repetition_penalty!r}"
            )
        object.__setattr__(self, "repetition_penalty", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            penalty = _check_float(name, getattr(self, name), "in [-2, 2]")
            if not -MAX_ABS_OPENAI_PENALTY <= penalty <= MAX_ABS_OPENAI_PENALTY:
                raise RequestError(f"{name} must be in [-2, 2] (0 = disabled), got {penalty!r}")
            object.__setattr__(self, name, penalty)

        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED, "in [0, 2**64 - 1] or null")

        object.__setattr__(self, "stop", self._normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))

        _check_bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] or null")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] or null")
        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("detokenize", self.detokenize)
        if not self.detokenize and self.stop:
            raise RequestError("stop strings need detokenize=True: they are matched in the text")
        _check_int("n", self.n, 1, MAX_N, f"in [1, {MAX_N}]")
        guided = GuidedDecoding.from_fields(self.guided_json, self.guided_regex)
        if guided is not None and guided.kind == "json":
            object.__setattr__(self, "guided_json", guided.spec)
        object.__setattr__(self, "_guided", guided)  # derived, not a field: read it as `guided`
        object.__setattr__(self, "logit_bias", self._normalise_logit_bias(self.logit_bias))

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise RequestError(f"stop must be a string or a list of strings, got {stop!r} ({type(stop).__name__})")
        if len(stop) > MAX_STOP_STRINGS:
            raise RequestError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for index, item in enumerate(stop):
            if not isinstance(item, str):
                raise RequestError(f"stop[{index}] must be a string, got {item!r} ({type(item).__name__})")
            if item == "":
                raise RequestError(f"stop[{index}] is an empty string; every stop string needs at least one character")
        return tuple(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
        if not isinstance(ids, (list, tuple)):
            raise RequestError(f"stop_token_ids must be a list of integers, got {ids!r} ({type(ids).__name__})")
        for index, item in enumerate(ids):
            _check_int(f"stop_token_ids[{index}]", item, 0, None, ">= 0")
        return tuple(ids)

    def choices(self) -> list[SamplingParams]:
        """The n requests that give this one's n completions, each with n=1; with a seed, choice i
        is seeded seed + i (mod 2**64), so the choices differ and each one is reproducible."""
        if self.n == 1:
            return [self]
        return [
            dataclasses.replace(self, n=1, seed=None if self.seed is None else (self.seed + i) % (MAX_SEED + 1))
            for i in range(self.n)
        ]

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        """A dict of int token id -> float bias (OpenAI's string keys of ids accepted), None when empty."""
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise RequestError(f"logit_bias must map token ids to biases, got {bias!r} ({type(bias).__name__})")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise RequestError(f"logit_bias accepts at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise RequestError(f"logit_bias keys must be token ids (integers >= 0), got {key!r}")
            amount = _check_float(f"logit_bias[{key!r}]", value, "in [-100, 100]")
            if not -MAX_ABS_LOGIT_BIAS <= amount <= MAX_ABS_LOGIT_BIAS:
                raise RequestError(f"logit_bias[{key!r}] must be in [-100, 100], got {amount!r}")
            out[token] = amount
        return out or None

    @property
    def guided(self) -> GuidedDecoding | None:
        """The constraint guided_json or guided_regex set, its grammar checked; None without one."""
        guided: GuidedDecoding | None = self.__dict__["_guided"]
        return guided

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax (temperature 0)."""
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from a JSON-like mapping, e.g. the sampling fields of an API request.

        Unknown keys raise `RequestError` listing them and the valid names, so a typo
        such as ``temprature`` never silently falls back to the default.
        """
        if not isinstance(values, Mapping):
            raise RequestError(f"sampling parameters must be a mapping of name to value, got {type(values).__name__}")
        unknown = sorted(repr(key) for key in values if key not in cls.FIELD_NAMES)
        if unknown:
            raise RequestError(
                f"unknown sampling parameter(s): {', '.join(unknown)}; valid names are: {', '.join(cls.FIELD_NAMES)}"
            )
        return cls(**values)


SamplingParams.FIELD_NAMES = tuple(field.name for field in dataclasses.fields(SamplingParams))
