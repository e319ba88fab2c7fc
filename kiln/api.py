"""kiln's Python surface: build(), LLM and SamplingParams."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.config import BuildConfig, RuntimeConfig
from kiln.errors import RequestError
from kiln.progress import Progress
from kiln.runtime.engine import Engine, StepUpdate
from kiln.runtime.prompts import Prompt, is_token_ids
from kiln.sampling_params import SamplingParams


def build(checkpoint: str | Path, output: str | Path, *, progress: bool = True, **options: Any) -> Path:
    """Build an engine directory from a Hugging Face checkpoint. `options` are BuildConfig fields."""
    from kiln.compiler.build import build_engine

    config = BuildConfig.from_dict(options)
    return build_engine(checkpoint, output, config, progress=Progress(enabled=progress))


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class LLM:
    """Generate with an engine directory built by `kiln build`."""

    def __init__(self, engine_dir: str | Path, *, progress: bool = False, **runtime: Any) -> None:
        self.engine = Engine(engine_dir, RuntimeConfig.from_dict(runtime), progress=Progress(enabled=progress))
        self.tokenizer = self.engine.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        return self.engine.encode(prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_update: Callable[[StepUpdate], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt in one batch; outputs come back in prompt order.

        Every prompt is validated before any runs, so one bad prompt loses no work.
        """
        batch: list[Prompt] = [prompts] if isinstance(prompts, str) or is_token_ids(prompts) else list(prompts)  # type: ignore[arg-type, list-item]
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(batch):
            raise RequestError(f"got {len(param_list)} SamplingParams for {len(batch)} prompts")
        encoded = [self.encode(p) for p in batch]
        for i, (ids, p) in enumerate(zip(encoded, param_list)):
            try:
                self.engine.validate(ids, p)
            except RequestError as exc:
                raise RequestError(f"prompt {i}: {exc}") from exc
        seqs = [self.engine.add_request(ids, p) for ids, p in zip(encoded, param_list)]
        start = time.perf_counter()
        try:
            while any(not s.is_finished for s in seqs):
                for update in self.engine.step():
                    if on_update is not None:
                        on_update(update)
        finally:  # an error or interrupt mid-way leaves no request holding cache blocks
            for seq in seqs:
                if not seq.is_finished:
                    self.engine.abort(seq.request_id)
        outputs = []
        for prompt, seq in zip(batch, seqs):
            self.engine.sequences.pop(seq.request_id, None)
            first = seq.first_token_time or start
            end = seq.finish_time or time.perf_counter()
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=seq.prompt_ids,
                    text=seq.detokenizer.text,
                    token_ids=list(seq.output_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=seq.logprobs or None,
                    metrics={
                        "time_to_first_token_s": first - seq.arrival_time,
                        "total_s": end - seq.arrival_time,
                        "decode_tokens_per_s": (len(seq.output_ids) - 1) / (end - first) if end > first else 0.0,
                        "num_preemptions": seq.num_preemptions,
                        "num_cached_tokens": seq.num_cached_tokens,
                    },
                )
            )
        return outputs
