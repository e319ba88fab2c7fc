"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): native-resolution ViT with windowed attention, M-RoPE LLM.

An image becomes a grid of 14x14 patches (`image_grid_thw`), every 2x2 block of which the merger turns
into one feature row. transformers derives the vision tower's attention layout from the grid with
data-dependent Python (`cu_seqlens.tolist()` splits, a window permutation); here the host computes,
per batch of images, each patch's (row, column) for the 2-D rotary embedding, its image and its
window, and the vision program masks attention by segment: the layers in `fullatt_block_indexes`
attend within an image (or video frame), the others within a window. Patches stay in the processor's order (the
window permutation only made windows contiguous for the split attention), so the merger's output
needs no un-permuting. The vision program's dynamic dimension is the patch count of a batch.

The LLM takes `[3, T]` positions (temporal, height, width), computed as transformers' `get_rope_index`
does; text after an image continues from the largest position + 1, and generated tokens at `p + delta`.

A video is an item of the same vision program (`video_grid_thw`: t temporal patches of 2 frames), each
temporal slice its own full-attention segment as in transformers; its temporal positions step by
`tokens_per_second * second_per_grid_ts`. The processor (images, videos, token expansion) is
`qwen_processor.QwenVLImageProcessor`, which needs no torchvision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import ImageItem, VisionExample, VisionLanguageFamily, VisionProgram, detach_modules
from kiln.models.vlm.qwen_processor import QwenVLImageProcessor
from kiln.models.vlm.qwen_video import DEFAULT_MAX_PIXELS, DEFAULT_NUM_FRAMES

DEFAULT_IMAGE_TOKENS = 1280  # feature rows of one image at the image processor's default max_pixels (28*28*1280)
MAX_VISION_BATCH_ROWS = 8 * DEFAULT_IMAGE_TOKENS  # the image-only default's vision batch at max_batch_size 8


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Qwen2_5VLVision(nn.Module):
    """Patches grouped by merge unit U (U=4): pixels [M, U, C*T*ps*ps], (row, column) [M, U, 2], image id [M, U],
    window id [M, U] -> features [M, hidden]. The dynamic dimension is M, the merged tokens of the batch (grouping
    keeps the patch count a multiple of U without a derived dimension, which Inductor cannot take as an input size).

    The blocks' own modules (norms, qkv, projection, MLP) and the merger, with attention computed here:
    the rotary embedding from each patch's (row, column), SDPA with a same-segment mask.
    """

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.patch_embed = visual.patch_embed
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.full_layers = {int(i) for i in visual.fullatt_block_indexes}
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone().float(), persistent=False)

    def _attention(
        self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        heads = int(attn.num_heads)
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(v.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return attn.proj(out[0].transpose(0, 1).reshape(n, -1))

    def forward(
        self, pixel_values: torch.Tensor, positions: torch.Tensor, image_ids: torch.Tensor, window_ids: torch.Tensor
    ) -> torch.Tensor:
        pixel_values = pixel_values.flatten(0, 1)
        positions, image_ids, window_ids = positions.flatten(0, 1), image_ids.flatten(), window_ids.flatten()
        hidden = self.patch_embed(pixel_values)
        freqs = (positions[..., None].float() * self.inv_freq).reshape(positions.shape[0], -1)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [P, 1, head_dim]: heads broadcast
        cos, sin = emb.cos(), emb.sin()
        same_image = image_ids[:, None] == image_ids[None, :]
        same_window = window_ids[:, None] == window_ids[None, :]
        for i, block in enumerate(self.blocks):
            mask = same_image if i in self.full_layers else same_window
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return self.merger(hidden)


def patch_layout(grid: list[int], merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of one image (in the processor's order): (row, column) [P, 2] and window number [P].

    The processor orders patches by temporal frame, then merge block (row-major), then within the block;
    a window is `window` x `window` merged tokens (transformers' `get_vision_window_index`).
    """
    t, h, w = grid
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(1, 2).flatten()
    cols = cols.reshape(block).transpose(1, 2).flatten()
    positions = torch.stack([rows, cols], dim=-1).repeat(t, 1)
    llm_h, llm_w = h // merge, w // merge
    per_row = -(-llm_w // window)
    per_frame = -(-llm_h // window) * per_row
    merged = torch.arange(t * llm_h * llm_w)
    frame, rest = merged // (llm_h * llm_w), merged % (llm_h * llm_w)
    windows = frame * per_frame + (rest // llm_w // window) * per_row + (rest % llm_w) // window
    return positions, windows.repeat_interleave(merge * merge)


def vision_inputs(grids: list[list[int]], merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions [P, 2], segment id [P] and window id [P] (unique over the batch) for images of these grids.

    A segment is one temporal slice of an image or video (the full-attention layers attend within it,
    as transformers' `cu_seqlens` split them); an image has one.
    """
    positions, segments, windows = [], [], []
    window_offset = segment_offset = 0
    for grid in grids:
        pos, win = patch_layout(grid, merge, window)
        positions.append(pos)
        segments.append(torch.arange(segment_offset, segment_offset + grid[0]).repeat_interleave(grid[1] * grid[2]))
        segment_offset += grid[0]
        windows.append(win + window_offset)
        window_offset += int(win.max()) + 1
    return torch.cat(positions), torch.cat(segments), torch.cat(windows)


def group_by_merge_unit(unit: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-patch tensors [P, ...] as [P / unit, unit, ...] (the vision program's input layout)."""
    return tuple(t.reshape(-1, unit, *t.shape[1:]) for t in tensors)


def rope_index(
    ids: list[int],
    grids: list[list[int]],
    image_token_id: int,
    merge: int,
    videos: Sequence[tuple[list[int], float]] = (),
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """[3, L] M-RoPE positions and the generated tokens' offset, as transformers' `get_rope_index`.

    `videos`: each video's grid and its temporal step (`tokens_per_second * second_per_grid_ts`): its
    temporal patch k sits at `int(k * step)` past the start (an image's step is 1).
    """
    pieces: list[torch.Tensor] = []
    media = {image_token_id: iter([(g, 1.0) for g in grids])}
    if video_token_id is not None:
        media[video_token_id] = iter(videos)
    current, i, n = 0, 0, len(ids)
    while i < n:
        if ids[i] not in media:
            j = i
            while j < n and ids[j] not in media:
                j += 1
            pieces.append(torch.arange(current, current + j - i)[None].expand(3, -1))
            current += j - i
            i = j
            continue
        token = ids[i]
        what = "image" if token == image_token_id else "video"
        entry = next(media[token], None)
        if entry is None:
            raise RequestError(f"the prompt has more {what} tokens than its {what}s have features")
        grid, step = entry
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        if ids[i : i + t * h * w].count(token) != t * h * w:
            raise RequestError(f"a {what}'s tokens in the prompt do not match its feature count")
        temporal = (torch.arange(t) * torch.tensor(step, dtype=torch.float32)).long()
        tt, hh, ww = torch.meshgrid(temporal, torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + current)
        current += max(h, w)
        i += t * h * w
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.int64)
    delta = int(positions.max()) + 1 - n if n else 0
    return positions, delta


class Qwen2_5VL(VisionLanguageFamily):
    architecture = "Qwen2_5_VLForConditionalGeneration"
    notes = "native-resolution ViT, windowed + full attention masked by segment; M-RoPE positions [3, T]"
    position_rows: ClassVar[int] = 3
    image_keys = ("pixel_values", "image_grid_thw")

    # ---- build ------------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def vision_module(self, model: nn.Module) -> nn.Module:
        return Qwen2_5VLVision(model.model.visual)  # type: ignore[union-attr]

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model.model, "visual")  # type: ignore[arg-type]

    def _merge_unit(self, config: Any) -> int:
        return int(config.vision_config.spatial_merge_size) ** 2

    def vision_example(self, config: Any, dtype: torch.dtype, device: torch.device, limit: int) -> VisionExample:
        """Two images (grids 1x4x6 and 1x6x4); the patch dimension is dynamic, a multiple of the merge unit."""
        vc = config.vision_config
        unit = self._merge_unit(config)
        grids = [[1, 4, 6], [1, 6, 4]]
        window = int(vc.window_size) // int(vc.spatial_merge_size) // int(vc.patch_size)
        positions, images, windows = vision_inputs(grids, int(vc.spatial_merge_size), window)
        width = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(positions.shape[0], width, generator=gen).to(device, dtype)
        merged = torch.export.Dim("merged_tokens", min=1, max=max(limit // unit, positions.shape[0] // unit))
        args = group_by_merge_unit(unit, pixels, positions.to(device), images.to(device), windows.to(device))
        return VisionExample(args, ({0: merged}, {0: merged}, {0: merged}, {0: merged}))

    def tokens_per_image(self, config: Any) -> int:
        """Feature rows of one image at the image processor's default largest size."""
        return DEFAULT_IMAGE_TOKENS

    def tokens_per_video(self, config: Any, num_frames: int = DEFAULT_NUM_FRAMES) -> int:
        """Frames x feature rows per frame (Video NeVA's count): temporal patches x rows at the video max_pixels."""
        vc = config.vision_config
        temporal = -(-num_frames // int(vc.temporal_patch_size))
        return temporal * DEFAULT_MAX_PIXELS // (int(vc.patch_size) * int(vc.spatial_merge_size)) ** 2

    def default_max_multimodal_len(self, config: Any, max_batch_size: int) -> int:
        """One largest image or one video of the default frame count per request, whichever has more rows."""
        return max_batch_size * max(self.tokens_per_image(config), self.tokens_per_video(config))

    def vision_batch_limit(self, config: Any, max_multimodal_len: int) -> int:
        """In patches (every feature row is one merge unit of patches), at most `MAX_VISION_BATCH_ROWS` rows or one
        default video: the dense segment mask grows with the square of a vision batch."""
        rows = min(max(1, max_multimodal_len), max(MAX_VISION_BATCH_ROWS, self.tokens_per_video(config)))
        return rows * self._merge_unit(config)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        vc = config.vision_config
        return {
            "image_token_id": int(config.image_token_id),
            "spatial_merge_size": int(vc.spatial_merge_size),
            "window": int(vc.window_size) // int(vc.spatial_merge_size) // int(vc.patch_size),
            "video_token_id": int(config.video_token_id),
            "tokens_per_second": int(getattr(vc, "tokens_per_second", 4)),
        }

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        return QwenVLImageProcessor.from_pretrained(path)

    def prompt_video_token(self, processor: Any) -> str | None:
        return str(processor.video_token)

    def video_sampling(self, processor: Any) -> tuple[int, int]:
        return processor.video.num_frames, processor.video.temporal_patch_size

    def process_media(
        self,
        processor: Any,
        prompt: str | list[int],
        images: list[Any],
        videos: list[Any],
        config: Mapping[str, Any],
    ) -> Mapping[str, torch.Tensor]:
        if not videos:
            return self.process(processor, prompt, images, config)
        return processor(text=[prompt], images=images or None, videos=videos, return_tensors="pt")

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        return _split(processed, "pixel_values", "image_grid_thw")

    def split_videos(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        """A video is one vision-program item: its temporal slices attend apart, as an image each."""
        return _split(processed, "pixel_values_videos", "video_grid_thw") if "video_grid_thw" in processed else []

    def encode(
        self,
        program: VisionProgram,
        items: list[ImageItem],
        limit: int,
        state: Mapping[str, torch.Tensor],
        config: Mapping[str, Any],
    ) -> list[torch.Tensor]:
        """Whole images in batches of at most `limit` patches; features [patches / merge unit, hidden] each."""
        merge = int(config["spatial_merge_size"])
        batches: list[list[ImageItem]] = [[]]
        used = 0
        for item in items:
            size = item.tensors["pixel_values"].shape[0]
            if size > limit:
                raise RequestError(
                    f"an image of {size} patches ({size // merge**2} tokens) is larger than this engine's vision "
                    f"batch ({limit} patches); use a smaller image or rebuild with a larger --max-multimodal-len"
                )
            if used + size > limit and batches[-1]:
                batches.append([])
                used = 0
            batches[-1].append(item)
            used += size
        features: list[torch.Tensor] = []
        for batch in batches:
            grids = [[int(v) for v in item.tensors["image_grid_thw"].tolist()] for item in batch]
            device = batch[0].tensors["pixel_values"].device
            extra = vision_inputs(grids, merge, int(config["window"]))
            pixels = torch.cat([item.tensors["pixel_values"] for item in batch])
            out = program(*group_by_merge_unit(merge**2, pixels, *(t.to(device) for t in extra)))
            features.extend(torch.split(out, [int(torch.tensor(g).prod()) // merge**2 for g in grids]))
        return features

    def mrope_positions(
        self, prompt_ids: list[int], processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> tuple[torch.Tensor, int]:
        grids = [[int(v) for v in g.tolist()] for g in processed.get("image_grid_thw", torch.zeros(0, 3))]
        video_grids = [[int(v) for v in g.tolist()] for g in processed.get("video_grid_thw", torch.zeros(0, 3))]
        seconds = processed.get("second_per_grid_ts", torch.zeros(0)).tolist()
        videos = [(g, int(config.get("tokens_per_second", 4)) * float(t)) for g, t in zip(video_grids, seconds)]
        return rope_index(
            prompt_ids,
            grids,
            int(config["image_token_id"]),
            int(config["spatial_merge_size"]),
            videos,
            self.video_token_id(config),
        )


def _split(processed: Mapping[str, torch.Tensor], pixels_key: str, grid_key: str) -> list[ImageItem]:
    grids = processed[grid_key]
    pixels = torch.split(processed[pixels_key], [int(g.prod()) for g in grids])
    return [ImageItem({"pixel_values": p, "image_grid_thw": g}) for p, g in zip(pixels, grids)]
