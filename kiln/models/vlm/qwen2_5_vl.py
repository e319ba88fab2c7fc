"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): native-resolution ViT with windowed attention, M-RoPE LLM.

An image becomes a grid of 14x14 patches (`image_grid_thw`), every 2x2 block of which the merger turns
into one feature row. transformers derives the vision tower's attention layout from the grid with
data-dependent Python (`cu_seqlens.tolist()` splits, a window permutation); here the host computes,
per batch of images, each patch's (row, column) for the 2-D rotary embedding, its image and its
window, and the vision program masks attention by segment: the layers in `fullatt_block_indexes`
attend within an image, the others within a window. Patches stay in the processor's order (the
window permutation only made windows contiguous for the split attention), so the merger's output
needs no un-permuting. The vision program's dynamic dimension is the patch count of a batch.

The LLM takes `[3, T]` positions (temporal, height, width), computed as transformers' `get_rope_index`
does; text after an image continues from the largest position + 1, and generated tokens at `p + delta`.

The checkpoint's `Qwen2_5_VLProcessor` also builds a video processor, which needs torchvision, so kiln
loads the tokenizer and the image processor only and expands `<|image_pad|>` itself, as that processor does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.errors import RequestError
from kiln.models.vlm.base import ImageItem, VisionExample, VisionLanguageFamily, VisionProgram, detach_modules

IMAGE_TOKEN = "<|image_pad|>"
DEFAULT_IMAGE_TOKENS = 1280  # feature rows of one image at the image processor's default max_pixels (28*28*1280)


class QwenVLImageProcessor:
    """Tokenizer + image processor with the output of `Qwen2_5_VLProcessor` for text and images (no video)."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = str(getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(self.image_token))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenVLImageProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, AutoImageProcessor.from_pretrained(path, local_files_only=True))

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    def __call__(
        self, text: str | list[str], images: list[Any] | None = None, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, torch.Tensor] = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = pixels["pixel_values"]
            out["image_grid_thw"] = pixels["image_grid_thw"]
            merge = int(self.image_processor.merge_size) ** 2
            counts = iter([int(g.prod()) // merge for g in out["image_grid_thw"]])
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                joined = pieces[0]
                for piece in pieces[1:]:
                    n = next(counts, None)
                    if n is None:
                        raise RequestError(f"the prompt has more {self.image_token} tokens than images")
                    joined += self.image_token * n + piece
                expanded.append(joined)
            texts = expanded
        tokens = self.tokenizer(texts, return_tensors=return_tensors)
        out = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], **out}
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long()
        return out


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
    """Positions [P, 2], image id [P] and window id [P] (unique over the batch) for images of these grids."""
    positions, images, windows = [], [], []
    window_offset = 0
    for i, grid in enumerate(grids):
        pos, win = patch_layout(grid, merge, window)
        positions.append(pos)
        images.append(torch.full((pos.shape[0],), i, dtype=torch.int64))
        windows.append(win + window_offset)
        window_offset += int(win.max()) + 1
    return torch.cat(positions), torch.cat(images), torch.cat(windows)


def group_by_merge_unit(unit: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-patch tensors [P, ...] as [P / unit, unit, ...] (the vision program's input layout)."""
    return tuple(t.reshape(-1, unit, *t.shape[1:]) for t in tensors)


def rope_index(ids: list[int], grids: list[list[int]], image_token_id: int, merge: int) -> tuple[torch.Tensor, int]:
    """[3, L] M-RoPE positions and the generated tokens' offset, as transformers' `get_rope_index` for images."""
    pieces: list[torch.Tensor] = []
    grid_iter = iter(grids)
    current, i, n = 0, 0, len(ids)
    while i < n:
        if ids[i] != image_token_id:
            j = i
            while j < n and ids[j] != image_token_id:
                j += 1
            pieces.append(torch.arange(current, current + j - i)[None].expand(3, -1))
            current += j - i
            i = j
            continue
        grid = next(grid_iter, None)
        if grid is None:
            raise RequestError("the prompt has more image tokens than its images have features")
        t, h, w = grid[0], grid[1] // merge, grid[2] // merge
        if ids[i : i + t * h * w].count(image_token_id) != t * h * w:
            raise RequestError("an image's tokens in the prompt do not match its feature count")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
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

    def vision_batch_limit(self, config: Any, max_multimodal_len: int) -> int:
        """In patches: every feature row is one merge unit of patches."""
        return max(1, max_multimodal_len) * self._merge_unit(config)

    def runtime_config(self, config: Any) -> dict[str, Any]:
        vc = config.vision_config
        return {
            "image_token_id": int(config.image_token_id),
            "spatial_merge_size": int(vc.spatial_merge_size),
            "window": int(vc.window_size) // int(vc.spatial_merge_size) // int(vc.patch_size),
        }

    # ---- run --------------------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        return QwenVLImageProcessor.from_pretrained(path)

    def split_images(self, processed: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> list[ImageItem]:
        grids = processed["image_grid_thw"]
        sizes = [int(g.prod()) for g in grids]
        pixels = torch.split(processed["pixel_values"], sizes)
        return [ImageItem({"pixel_values": p, "image_grid_thw": g}) for p, g in zip(pixels, grids)]

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
        return rope_index(prompt_ids, grids, int(config["image_token_id"]), int(config["spatial_merge_size"]))
