"""One request's state as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from kiln.sampling_params import SamplingParams

# Stands in a sequence's output for a token still being sampled (never a real id: ids are >= 0).
PENDING_TOKEN = -1


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: Any = None
    grammar: Any = None  # kiln.runtime.grammar.RequestGrammar of a request with guided_json / guided_regex
    detokenizer: Any = None
    logprobs: list[Any] = field(default_factory=list)
    # With params.prompt_logprobs: [None, then one TokenLogprobs per prompt token scored so far].
    prompt_logprobs: list[Any] | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    mm: Any = None  # kiln.runtime.multimodal.MultimodalData of a prompt with images (its mm_hashes, block keys)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    # Optional per-block extra prefix-cache keys (e.g. hashes of the images whose tokens a block holds).
    block_extra_keys: list[Any] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (a decode step reads one)."""
        split = len(self.prompt_ids)
        if start >= split:
            return self.output_ids[start - split : end - split]
        if end <= split:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - split]

    def schedulable(self, start: int, num_tokens: int) -> int:
        """How many of `num_tokens` tokens from `start` may run as one chunk (an image block is never split)."""
        return num_tokens if self.mm is None else self.mm.clip_chunk(start, num_tokens)

    @property
    def needs_prompt_logits(self) -> bool:
        """Some prompt token's log-prob is still to be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
