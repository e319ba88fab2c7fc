"""A vision-language engine's two programs as `ProgramSpec`s: the vision program and the LLM program.

The LLM program has the text signature (`capture.INPUT_NAMES`) plus the prompt-embedding table:
`mm_embeds [M, hidden]` (M >= 1) and `mm_index [T]` (row of mm_embeds per packed token, -1 for
text), and for families whose image tokens attend to their whole image, `attend_end [T]`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.compiler.capture import INPUT_NAMES, dynamic_shapes, mixed_step_inputs, step_inputs
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.engine.manifest import VISION_DIR

MM_INPUT_NAMES = ("mm_embeds", "mm_index")
LIMITS_INPUT = "attend_end"


def llm_input_names(bidirectional_images: bool) -> tuple[str, ...]:
    return INPUT_NAMES + MM_INPUT_NAMES + ((LIMITS_INPUT,) if bidirectional_images else ())


def splice_images(model: Any, input_ids: torch.Tensor, mm_embeds: torch.Tensor, mm_index: torch.Tensor) -> torch.Tensor:
    """The packed tokens' embeddings [T, hidden], image tokens' replaced by their rows of mm_embeds."""
    is_image = mm_index >= 0
    embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    rows = mm_embeds.index_select(0, mm_index.clamp(min=0)).to(embeds.dtype)
    return torch.where(is_image[:, None], rows, embeds)


class PackedMultimodalLM(nn.Module):
    """Embeds packed tokens, splices in image-feature rows and calls the model with inputs_embeds."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        logits_indices: torch.Tensor,
        kv_cache: torch.Tensor,
        mm_embeds: torch.Tensor,
        mm_index: torch.Tensor,
        attend_end: torch.Tensor | None = None,  # read by the paged-attention op, wired in by a pass
    ) -> torch.Tensor:
        embeds = splice_images(self.model, input_ids, mm_embeds, mm_index)
        position_ids = positions[None] if positions.dim() == 1 else positions[:, None]
        out = self.model(
            inputs_embeds=embeds[None], position_ids=position_ids, use_cache=False, logits_to_keep=logits_indices
        )
        return out.logits[0]


def mm_step_inputs(
    base: tuple[torch.Tensor, ...], hidden: int, position_rows: int, bidirectional: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """The text step's inputs plus image rows for some of its tokens (every third token is an image token)."""
    positions = base[1]
    tokens = positions.shape[0]
    is_image, index, embeds = image_rows(tokens, hidden, 1, dtype, positions.device)
    if position_rows > 1:
        positions = positions[None].expand(position_rows, tokens).contiguous()
    extra: tuple[torch.Tensor, ...] = ()
    if bidirectional:
        extra = (base[1] + 1 + is_image.to(positions.device).long(),)  # image tokens also see the next token
    return (base[0], positions, *base[2:], embeds, index, *extra)


def image_rows(
    tokens: int, hidden: int, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every third token (1, 4, ...) an image token: (is_image [T] on the CPU, mm_index [T], random image
    rows mm_embeds [M, hidden], at least two)."""
    gen = torch.Generator().manual_seed(seed)
    is_image = torch.arange(tokens) % 3 == 1
    index = torch.where(is_image, is_image.long().cumsum(0) - 1, -1).to(device)
    embeds = torch.randn(max(int(is_image.sum()), 2), hidden, generator=gen).to(device, dtype)
    return is_image, index, embeds


def llm_spec(
    model: nn.Module,
    cache: CacheShape,
    *,
    hidden: int,
    position_rows: int,
    bidirectional: bool,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_num_tokens: int,
    max_batch_size: int,
    architecture: str,
) -> ProgramSpec:
    """The LLM program: dynamic token, sequence, cache and table sizes, verified on a mixed step with images."""
    base = step_inputs(cache, dtype, device, block_size, cached=(0, 0), new=(3, 5))
    args = mm_step_inputs(base, hidden, position_rows, bidirectional, dtype)
    shapes = list(dynamic_shapes(max(max_num_tokens, 9), max(max_batch_size, 2)))
    tokens = shapes[0][0]
    if position_rows > 1:
        shapes[1] = {1: tokens}
    shapes += [{0: torch.export.Dim("mm_rows", min=1)}, {0: tokens}]
    if bidirectional:
        shapes.append({0: tokens})
    mixed = mixed_step_inputs(cache, dtype, device, block_size)
    check = mm_step_inputs(mixed, hidden, position_rows, bidirectional, dtype)
    return ProgramSpec(
        module=PackedMultimodalLM(model).eval(),
        args=args,
        dynamic_shapes=tuple(shapes),
        what=f"the language model of {architecture}",
        architecture=architecture,
        input_names=llm_input_names(bidirectional),
        check_inputs=check,
        cache=cache,
    )


def vision_spec(
    module: nn.Module, args: tuple[torch.Tensor, ...], shapes: tuple[Any, ...], architecture: str
) -> ProgramSpec:
    """The vision program, in vision/: `module` on `args` with its dynamic image (or patch) dimension, no passes."""
    return ProgramSpec(
        module=module,
        args=args,
        dynamic_shapes=shapes,
        what=f"the vision encoder of {architecture}",
        architecture=architecture,
        directory=VISION_DIR,
        passes=False,
    )
