"""Prompts with images: preprocessing, the vision program, and the per-request data the LLM program reads.

`MultimodalPipeline.prepare([(prompt, images), ...])` loads and checks the images, expands the
prompt with the checkpoint's own processor (one image token -> that image's feature count), runs
the vision program over the images of all requests in batches, and returns one `MultimodalPrompt`
per request: the expanded token ids and a `MultimodalData` that `Engine.validate(..., mm)`
stores on the sequence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.config import torch_dtype
from kiln.engine.manifest import VISION_DIR, VISION_STATE, Manifest, MultimodalFacts
from kiln.engine.programs import Program, load_program
from kiln.engine.tokenizers import load_processor
from kiln.errors import KilnError, RequestError
from kiln.models.vlm import ImageItem, VisionLanguageFamily, family_for
from kiln.models.vlm.custom import tensor_digest
from kiln.runtime.images import ImageSource, image_digest, load_image
from kiln.runtime.video import load_video


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's tokens stand in the prompt, and a hash of its pixels."""

    start: int
    end: int
    digest: str


@dataclass(eq=False)
class MultimodalData:
    """What the LLM program needs about one request's images (kept on its Sequence)."""

    embeds: torch.Tensor  # [image tokens, hidden]: every image's features, in prompt order (on the device)
    rows: torch.Tensor  # [prompt_len] int64: the row of `embeds` for each prompt token, -1 for text
    spans: tuple[ImageSpan, ...]
    blocks: tuple[tuple[int, int], ...] = ()  # runs of image tokens that attend bidirectionally (never split)
    positions: torch.Tensor | None = None  # [3, prompt_len] M-RoPE positions
    position_delta: int = 0  # generated token at position p gets p + position_delta on every M-RoPE row
    cross_spans: torch.Tensor | None = None  # [prompt_len, 2] each token's cross-attention rows (Mllama)

    @property
    def prompt_len(self) -> int:
        return int(self.rows.shape[0])

    def clip_chunk(self, start: int, num_tokens: int) -> int:
        """How many of `num_tokens` tokens from `start` fit in one chunk without splitting an image block."""
        end = start + num_tokens
        for first, stop in self.blocks:
            if first < end < stop:
                end = first if first > start else start
        return end - start

    def block_at(self, start: int) -> int:
        """Tokens of the image block that begins at `start` (0 when none does)."""
        return next((stop - first for first, stop in self.blocks if first == start), 0)

    def attend_end(self, start: int, end: int) -> torch.Tensor:
        """Exclusive key bound of tokens [start, end): p + 1, or the end of the token's image block."""
        limits = torch.arange(start + 1, end + 1)
        for first, stop in self.blocks:
            lo, hi = max(first, start), min(stop, end)
            if lo < hi:
                limits[lo - start : hi - start] = stop
        return limits

    def block_extra_keys(self, block_size: int) -> list[tuple[str, ...]]:
        """Per KV-cache block of the prompt, the digests of the images whose tokens it holds (prefix-cache keys)."""
        num_blocks = -(-self.prompt_len // block_size)
        keys: list[tuple[str, ...]] = []
        for b in range(num_blocks):
            lo, hi = b * block_size, (b + 1) * block_size
            keys.append(tuple(s.digest for s in self.spans if s.start < hi and s.end > lo))
        return keys

    @property
    def mm_hashes(self) -> tuple[str, ...]:
        return tuple(s.digest for s in self.spans)


@dataclass(frozen=True)
class MultimodalPrompt:
    """A request ready for `Engine.validate(prompt_ids, params, mm)`."""

    prompt_ids: list[int]
    mm: MultimodalData | None
    num_images: int = 0


@dataclass
class _Pending:
    ids: list[int]
    items: list[ImageItem]  # the images, then the videos
    digests: list[str]
    processed: dict[str, torch.Tensor]
    num_images: int = 0


# One request: (prompt, images) or (prompt, images, videos) or (prompt, images, videos, num_frames)
MediaRequest = tuple[Any, ...]


@dataclass
class PipelineTimings:
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    num_images: int = 0
    vision_calls: list[float] = field(default_factory=list)


def image_blocks(is_image: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive image tokens, as (start, end)."""
    flags = is_image.tolist()
    runs: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return tuple(runs)


class MultimodalPipeline:
    """The vision side of a vision-language engine: processor, vision program, family hooks."""

    def __init__(self, engine_dir: Path, manifest: Manifest, device: torch.device, *, use_compiled: bool = True):
        if manifest.multimodal is None:
            raise KilnError(f"{engine_dir} is a text-only engine")
        self.facts: MultimodalFacts = manifest.multimodal
        self.family: VisionLanguageFamily = family_for(manifest.model.architecture)
        self.device = device
        self.dtype = torch_dtype(manifest.build.dtype)
        self.max_input_len = manifest.build.input_len
        self.max_num_tokens = manifest.build.max_num_tokens
        self.processor = load_processor(engine_dir, self.family)
        self.image_token = self.family.prompt_image_token(self.processor)
        self.video_token_id = self.family.video_token_id(self.facts.family_config)
        self.video_token = self.family.prompt_video_token(self.processor) if self.video_token_id is not None else None
        self.compiled = self.facts.vision_compiled and use_compiled
        self.program = self._load_program(engine_dir / VISION_DIR, manifest.op_modules)
        self.state = self._load_state(engine_dir / VISION_DIR / VISION_STATE)
        self.timings = PipelineTimings()

    def _load_program(self, vision_dir: Path, op_modules: dict[str, tuple[str, ...]]) -> Program:
        return load_program(vision_dir, self.device, compiled=self.compiled, op_modules=op_modules).program

    def _load_state(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            return {}
        from safetensors.torch import load_file

        return {k: v.to(self.device) for k, v in load_file(str(path)).items()}

    # ---- preprocessing ----------------------------------------------------------------------------

    def _check_prompt(self, prompt: str, num_images: int) -> None:
        most = self.family.max_images_per_prompt
        if most is not None and num_images > most:
            raise RequestError(f"{self.family.architecture} takes at most {most} image(s) per prompt, got {num_images}")
        if self.image_token is None:
            return
        found = prompt.count(self.image_token)
        if found != num_images:
            raise RequestError(
                f"the prompt has {found} {self.image_token} token(s) for {num_images} image(s); "
                f"write {self.image_token} once where each image goes"
            )

    def _load_videos(self, prompt: str | list[int], sources: Sequence[Any], num_frames: int | None) -> list[Any]:
        """The videos' sampled frames (`kiln.runtime.video`), after checking the engine and prompt take them."""
        if not sources:
            return []
        if self.video_token is None:
            raise RequestError(f"{self.family.architecture} takes no video input in kiln (images only)")
        if not isinstance(prompt, str):
            raise RequestError("a prompt with videos must be text (the processor places the video tokens)")
        found = prompt.count(self.video_token)
        if found != len(sources):
            raise RequestError(
                f"the prompt has {found} {self.video_token} token(s) for {len(sources)} video(s); "
                f"write {self.video_token} once where each video goes"
            )
        default, multiple = self.family.video_sampling(self.processor)
        return [load_video(s, num_frames or default, multiple) for s in sources]

    def _preprocess(
        self, prompt: str | list[int], sources: Sequence[ImageSource], videos: Sequence[Any], num_frames: int | None
    ) -> _Pending:
        if self.family.loads_images:
            if not isinstance(prompt, str) and (sources or videos):
                raise RequestError("a prompt with images must be text (the processor places the image tokens)")
            images: list[Any] = [load_image(s) for s in sources]
            if isinstance(prompt, str):
                self._check_prompt(prompt, len(images))
            digests = [image_digest(im) for im in images]
        else:  # the vision program's own input tensors
            images = list(sources)
            digests = [tensor_digest(tuple(im) if isinstance(im, (tuple, list)) else (im,)) for im in images]
        clips = self._load_videos(prompt, videos, num_frames)
        digests += [clip.digest() for clip in clips]
        config = self.facts.family_config
        processed = dict(self.family.process_media(self.processor, prompt, images, clips, config))
        ids = [int(t) for t in processed["input_ids"][0].tolist()]
        num_image_tokens = int(self._media_mask(ids, processed).sum())
        if len(ids) > self.max_input_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens with its {len(images)} image(s)"
                + (f" and {len(clips)} video(s)" if clips else "")
                + f" expanded ({num_image_tokens} image tokens), more than this engine's max_input_len "
                f"({self.max_input_len}); shorten it, use fewer images"
                + (" or frames (num_frames)" if clips else "")
                + ", or rebuild with a larger --max-input-len"
            )
        split = self.family.split_images(processed, config) if images else []
        split += self.family.split_videos(processed, config) if clips else []
        items = [item.to(self.device, self.dtype) for item in split]
        return _Pending(ids, items, digests, processed, len(images))

    def _in_prompt_order(self, pending: _Pending, features: list[torch.Tensor]) -> list[int]:
        """Order of the items (images first, then videos) as their tokens stand in the prompt."""
        if self.video_token_id is None or pending.num_images == len(features):
            return list(range(len(features)))
        queues = {
            self.facts.image_token_id: iter(range(pending.num_images)),
            self.video_token_id: iter(range(pending.num_images, len(features))),
        }
        order, i, ids = [], 0, pending.ids
        while i < len(ids):
            queue = queues.get(ids[i])
            item = next(queue, None) if queue is not None else None
            if item is None:
                i += 1
                continue
            order.append(item)
            i += features[item].shape[0]
        return order if sorted(order) == list(range(len(features))) else list(range(len(features)))

    def _media_mask(self, ids: list[int], processed: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompt positions that take image or video feature rows (the family places images)."""
        tokens = torch.tensor(ids, dtype=torch.int64)
        mask = self.family.image_mask(tokens, processed, self.facts.image_token_id)
        return mask if self.video_token_id is None else mask | (tokens == self.video_token_id)

    def _finish(self, pending: _Pending, features: list[torch.Tensor]) -> MultimodalPrompt:
        is_image = self._media_mask(pending.ids, pending.processed)
        order = self._in_prompt_order(pending, features)
        features = [features[k] for k in order]
        pending.digests = [pending.digests[k] for k in order]
        if not features:
            if bool(is_image.any()):
                raise RequestError("the prompt contains image tokens but no image was given")
            return MultimodalPrompt(pending.ids, None, 0)
        counts = [f.shape[0] for f in features]
        if int(is_image.sum()) != sum(counts):
            raise RequestError(
                f"the prompt holds {int(is_image.sum())} image tokens, but its images have {sum(counts)} features; "
                "write the image token once per image and let kiln expand it"
            )
        rows = torch.where(is_image, is_image.long().cumsum(0) - 1, -1)
        where = torch.nonzero(is_image).flatten().tolist()
        spans, offset = [], 0
        for count, digest in zip(counts, pending.digests):
            spans.append(ImageSpan(where[offset], where[offset + count - 1] + 1, digest))
            offset += count
        blocks = image_blocks(is_image) if self.facts.bidirectional_images else ()
        too_long = [b for b in blocks if b[1] - b[0] > self.max_num_tokens]
        if too_long:
            raise RequestError(
                f"an image of {too_long[0][1] - too_long[0][0]} tokens must be computed in one step, but this engine's "
                f"max_num_tokens is {self.max_num_tokens}; rebuild with a larger --max-num-tokens"
            )
        positions, delta = None, 0
        if self.facts.position_rows > 1:
            positions, delta = self.family.mrope_positions(pending.ids, pending.processed, self.facts.family_config)
        cross = self.family.cross_attention_rows(pending.ids, pending.processed, self.facts.family_config)
        if cross is not None:  # the encoder positions store the feature rows in the family's order
            rows[is_image] = rows[is_image][cross.order]
        cross_spans = None if cross is None else cross.spans
        mm = MultimodalData(torch.cat(features), rows, tuple(spans), blocks, positions, delta, cross_spans)
        return MultimodalPrompt(pending.ids, mm, len(counts))

    def prepare(self, requests: Sequence[MediaRequest], labels: Sequence[int] | None = None) -> list[MultimodalPrompt]:
        """Preprocess every request (all errors before any vision work), then encode all images and videos
        in batches. A request is (prompt, images[, videos[, num_frames]]) (`MediaRequest`).

        Errors name the request as `prompt {labels[i]}` (default: its index here).
        """
        labels = list(labels) if labels is not None else list(range(len(requests)))
        start = time.perf_counter()
        pending = []
        for i, request in enumerate(requests):
            prompt, images = request[0], request[1]
            videos = request[2] if len(request) > 2 else ()
            num_frames = request[3] if len(request) > 3 else None
            try:
                pending.append(self._preprocess(prompt, images, videos or (), num_frames))
            except RequestError as exc:
                raise RequestError(f"prompt {labels[i]}: {exc}") from exc
        self.timings.preprocess_s = time.perf_counter() - start
        start = time.perf_counter()
        items = [item for p in pending for item in p.items]
        features: list[torch.Tensor] = []
        if items:
            with torch.inference_mode():
                features = self.family.encode(
                    self.program, items, self.facts.vision_batch_limit, self.state, self.facts.family_config
                )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.timings.vision_s = time.perf_counter() - start
        self.timings.num_images = len(items)
        out, offset = [], 0
        for i, p in enumerate(pending):
            try:
                out.append(self._finish(p, features[offset : offset + len(p.items)]))
            except RequestError as exc:
                raise RequestError(f"prompt {labels[i]}: {exc}") from exc
            offset += len(p.items)
        return out


def load_pipeline(
    engine_dir: Path, manifest: Manifest, device: torch.device, use_compiled: bool = True
) -> MultimodalPipeline | None:
    """The engine's vision side, or None for a text-only engine."""
    if manifest.multimodal is None:
        return None
    return MultimodalPipeline(engine_dir, manifest, device, use_compiled=use_compiled)
