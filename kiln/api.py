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
from kiln.runtime.engine import Engine
from kiln.runtime.multimodal import MultimodalData, PipelineTimings
from kiln.runtime.output_processor import StepUpdate
from kiln.runtime.prompts import Prompt, is_token_ids
from kiln.runtime.validation import check_text
from kiln.sampling_params import SamplingParams

# A prompt with images: {"prompt": "USER: <image>\nDescribe. ASSISTANT:", "images": [path, data URL, bytes or PIL]}
# and/or videos: {"prompt": ..., "videos": [path, data URL or bytes], "num_frames": 8} (num_frames optional)
MultimodalInput = dict[str, Any]
PromptInput = Prompt | MultimodalInput
Conversation = list[dict[str, Any]]  # [{"role": "user", "content": "Hi"}, ...]


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
    # With SamplingParams(prompt_logprobs=k): None for the first prompt token, then a TokenLogprobs each.
    prompt_logprobs: list[Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    index: int = 0  # which of the prompt's SamplingParams.n completions this is


MULTIMODAL_KEYS = ("prompt", "images", "videos", "num_frames")


def split_multimodal_input(prompt: MultimodalInput, index: int = 0) -> tuple[str | list[int], list[Any]]:
    """(prompt, images) of a {"prompt": ..., "images": [...]} request; unknown keys are errors."""
    text, images, _, _ = split_media_input(prompt, index)
    return text, images


def split_media_input(
    prompt: MultimodalInput, index: int = 0
) -> tuple[str | list[int], list[Any], list[Any], int | None]:
    """(prompt, images, videos, num_frames) of a {"prompt", "images", "videos", "num_frames"} request."""
    unknown = sorted(set(prompt) - set(MULTIMODAL_KEYS))
    if unknown or "prompt" not in prompt:
        keys = ", ".join(repr(k) for k in MULTIMODAL_KEYS)
        raise RequestError(f"prompt {index}: a dict prompt has keys {keys} (got {sorted(prompt)})")
    media = []
    for key in ("images", "videos"):
        items = prompt.get(key) or []
        media.append(list(items) if isinstance(items, (list, tuple)) else [items])
    num_frames = prompt.get("num_frames")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise RequestError(f"prompt {index}: num_frames must be a positive integer, got {num_frames!r}")
    return prompt["prompt"], media[0], media[1], num_frames


def _prompt_text(prompt: object) -> str | None:
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
        return str(prompt["prompt"])
    return None


class LLM:
    """Generate with an engine directory built by `kiln build`."""

    def __init__(self, engine_dir: str | Path, *, progress: bool = False, **runtime: Any) -> None:
        self.engine = Engine(engine_dir, RuntimeConfig.from_dict(runtime), progress=Progress(enabled=progress))
        self.tokenizer = self.engine.tokenizer
        self.last_profile: dict[str, float] = {}

    def encode(self, prompt: Prompt) -> list[int]:
        return self.engine.encode(prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    def _prepare(self, batch: list[PromptInput]) -> list[tuple[list[int], MultimodalData | None]]:
        """Token ids (image tokens expanded) and image data of every prompt; every error before any work."""
        if self.engine.multimodal is not None:
            self.engine.multimodal.timings = PipelineTimings()
        encoded: list[tuple[list[int], MultimodalData | None] | None] = []
        with_images: list[tuple[int, tuple[Any, ...]]] = []
        for i, prompt in enumerate(batch):
            if isinstance(prompt, dict):
                text, images, videos, num_frames = split_media_input(prompt, i)
                if images or videos:
                    if self.engine.multimodal is None:
                        what = "images" if images else "videos"
                        raise RequestError(
                            f"prompt {i}: this engine was built from a text-only checkpoint and takes no {what}"
                        )
                    with_images.append((i, (text, images, videos, num_frames)))
                    encoded.append(None)
                    continue
                prompt = text
            try:
                if isinstance(prompt, str):
                    check_text(prompt)
                encoded.append((self.encode(prompt), None))
            except RequestError as exc:
                raise RequestError(f"prompt {i}: {exc}") from exc
        if with_images and self.engine.multimodal is not None:
            prepared = self.engine.multimodal.prepare(
                [request for _, request in with_images], labels=[i for i, _ in with_images]
            )
            for (i, _), mm_prompt in zip(with_images, prepared):
                encoded[i] = (mm_prompt.prompt_ids, mm_prompt.mm)
        return [e for e in encoded if e is not None]

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_update: Callable[[StepUpdate], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt in one batch; outputs come back in prompt order, each prompt's
        `SamplingParams.n` completions one after the other (`RequestOutput.index` 0..n-1).

        Every prompt is validated (once) before any runs, so one bad prompt loses no work.
        """
        single = isinstance(prompts, (str, dict)) or is_token_ids(prompts)
        batch: list[PromptInput] = [prompts] if single else list(prompts)  # type: ignore[list-item, arg-type]
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(batch):
            raise RequestError(f"got {len(param_list)} SamplingParams for {len(batch)} prompts")
        begin = time.perf_counter()
        encoded = self._prepare(batch)
        prepared = time.perf_counter()
        requests = []  # (prompt index, choice index, request)
        for i, ((ids, mm), sp) in enumerate(zip(encoded, param_list)):
            try:
                requests += [(i, c, self.engine.validate(ids, choice, mm)) for c, choice in enumerate(sp.choices())]
            except RequestError as exc:
                raise RequestError(f"prompt {i}: {exc}") from exc
        seqs = [self.engine.add_request(request) for _, _, request in requests]
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
        generated = time.perf_counter()
        outputs = []
        for (i, choice, _), seq in zip(requests, seqs):
            prompt = batch[i]
            first = seq.first_token_time or start
            end = seq.finish_time or time.perf_counter()
            outputs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    prompt=prompt if isinstance(prompt, str) else _prompt_text(prompt),
                    prompt_token_ids=seq.prompt_ids,
                    text=seq.detokenizer.text,
                    token_ids=list(seq.output_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=seq.logprobs or None,
                    prompt_logprobs=seq.prompt_logprobs,
                    metrics={
                        "time_to_first_token_s": first - seq.arrival_time,
                        "total_s": end - seq.arrival_time,
                        "decode_tokens_per_s": (len(seq.output_ids) - 1) / (end - first) if end > first else 0.0,
                        "num_preemptions": seq.num_preemptions,
                        "num_cached_tokens": seq.num_cached_tokens,
                    },
                    index=choice,
                )
            )
        self.last_profile = self._profile(seqs, begin, prepared, start, generated)
        return outputs

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_update: Callable[[StepUpdate], None] | None = None,
    ) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or to each of a list of them, through the
        engine's chat template (as `kiln run --chat` and the server's chat route do); `prompt` is the
        rendered conversation. A tokenizer without a chat template is a RequestError."""
        if not messages:
            raise RequestError("LLM.chat needs a conversation: a list of {'role': ..., 'content': ...} messages")
        single = isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts: list[PromptInput] = []
        for i, conversation in enumerate(conversations):
            try:
                prompts.append(self.apply_chat_template(list(conversation)))  # type: ignore[arg-type]
            except RequestError as exc:
                raise RequestError(f"conversation {i}: {exc}" if len(conversations) > 1 else str(exc)) from exc
        outputs = self.generate(prompts, sampling_params, on_update=on_update)
        for output in outputs:
            output.prompt = self.tokenizer.decode(output.prompt_token_ids)
        return outputs

    def _profile(
        self, seqs: list[Any], begin: float, prepared: float, start: float, generated: float
    ) -> dict[str, float]:
        """Seconds spent per stage of the last generate() call (one batch)."""
        pipeline = self.engine.multimodal
        vision_s = pipeline.timings.vision_s if pipeline is not None and pipeline.timings.num_images else 0.0
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        decode_start = time.perf_counter()
        self.tokenizer.batch_decode([s.output_ids for s in seqs], skip_special_tokens=True)
        decode_s = time.perf_counter() - decode_start
        tokens = sum(len(s.output_ids) for s in seqs)
        ttft = (max(firsts) - start) if firsts else 0.0
        steps_after_first = max((len(s.output_ids) - 1 for s in seqs), default=0)
        return {
            "preprocess_s": (prepared - begin) - vision_s,
            "vision_s": vision_s,
            "generate_s": generated - start,
            "time_to_first_token_s": ttft,
            "per_token_s": (generated - start - ttft) / steps_after_first if steps_after_first > 0 else 0.0,
            "decode_s": decode_s,
            "end_to_end_s": generated - begin + decode_s,
            "num_images": float(pipeline.timings.num_images if pipeline is not None else 0),
            "generated_tokens": float(tokens),
        }
