"""An encoder-decoder engine's two programs as `ProgramSpec`s: the encoder (in encoder/) and the decoder step.

The encoder takes a step's encoder tokens packed (`ENCODER_INPUT_NAMES`) and stores each decoder layer's
cross-attention keys/values at the sequences' first cache positions; the decoder takes the text
engine's signature plus `encoder_lens` (`DECODER_INPUT_NAMES`). Their attention ops are kiln's own
(`kiln::span_attention`, `kiln::store_kv`), emitted by the family's modules, so the attention passes
do not apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.compiler.capture import dynamic_shapes, step_inputs
from kiln.compiler.capture_mm import MM_INPUT_NAMES, image_rows
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.engine.manifest import ENCODER_DIR
from kiln.models.encdec import DECODER_INPUT_NAMES, ENCODER_INPUT_NAMES


def encoder_inputs(
    cache: CacheShape, dtype: torch.dtype, device: torch.device, block_size: int, lengths: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    """An encoder step over sequences of `lengths` tokens, each stored in blocks of its own."""
    gen = torch.Generator().manual_seed(2)
    per_seq = max(2, *(-(-n // block_size) for n in lengths))
    tables = torch.randperm(per_seq * len(lengths), generator=gen).view(len(lengths), per_seq)
    positions = torch.cat([torch.arange(n) for n in lengths])
    seq_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    slots = tables[seq_ids, positions // block_size] * block_size + positions % block_size
    cache_shape = (cache.num_layers, 2, tables.numel(), block_size, cache.num_kv_heads, cache.head_dim)
    tensors = (
        torch.randint(3, 8, (sum(lengths),), generator=gen),
        positions,
        seq_ids,
        slots,
        torch.randn(cache_shape, generator=gen).to(dtype),
    )
    return tuple(t.to(device) for t in tensors)


def decoder_inputs(
    cache: CacheShape,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    encoder_lens: tuple[int, ...],
    decoded: tuple[int, ...],
    new: tuple[int, ...],
) -> tuple[torch.Tensor, ...]:
    """A decoder step: sequence i has `encoder_lens[i]` encoder positions and `decoded[i]` decoder tokens
    cached, and `new[i]` decoder tokens to run."""
    cached = tuple(e + d for e, d in zip(encoder_lens, decoded))
    base = step_inputs(cache, dtype, device, block_size, cached=cached, new=new)
    offsets = torch.cat([torch.full((n,), e) for e, n in zip(encoder_lens, new)]).to(device)
    lens = torch.tensor(encoder_lens, dtype=torch.int32, device=device)
    return (base[0], base[1] - offsets, *base[2:], lens)


def cross_spans(encoder_lens: tuple[int, ...], new: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Example `cross_spans [T, 2]` of a decoder step: each sequence's first token before its images (0, -E), the
    rest reading rows [1, E - 1) ((0, 0) for a sequence without an encoder input)."""
    spans = [[(0, -e)] + [(1, max(e - 1, 1))] * (n - 1) if e else [(0, 0)] * n for e, n in zip(encoder_lens, new)]
    return torch.tensor([v for seq in spans for v in seq], dtype=torch.int64, device=device)


def with_images(inputs: tuple[torch.Tensor, ...], hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The encoder inputs plus image rows for every third token (`mm_embeds`, `mm_index`)."""
    _, index, embeds = image_rows(inputs[0].shape[0], hidden, 3, dtype, inputs[0].device)
    return (*inputs, embeds, index)


def encoder_spec(
    module: nn.Module,
    cache: CacheShape,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_num_tokens: int,
    architecture: str,
    image_hidden: int | None = None,
) -> ProgramSpec:
    """The encoder program; with `image_hidden`, it also takes a vision-language model's image rows
    (`mm_embeds [M, image_hidden]`, `mm_index [T]`, as the LLM program of `capture_mm` does)."""
    tokens = torch.export.Dim("tokens", min=1, max=max(max_num_tokens, 9))
    blocks = torch.export.Dim("blocks", min=1)
    args = encoder_inputs(cache, dtype, device, block_size, (3, 5))
    check = encoder_inputs(cache, dtype, device, block_size, (6, 2, 4))
    shapes: tuple[Any, ...] = ({0: tokens}, {0: tokens}, {0: tokens}, {0: tokens}, {2: blocks})
    names: tuple[str, ...] = ENCODER_INPUT_NAMES
    if image_hidden is not None:
        args, check = with_images(args, image_hidden, dtype), with_images(check, image_hidden, dtype)
        shapes += ({0: torch.export.Dim("mm_rows", min=1)}, {0: tokens})
        names += MM_INPUT_NAMES
    return _spec(module, args, check, shapes, names, f"the encoder of {architecture}", architecture, ENCODER_DIR)


def decoder_spec(
    module: nn.Module,
    cache: CacheShape,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_num_tokens: int,
    max_batch_size: int,
    architecture: str,
    decoder_prompt: bool = False,
) -> ProgramSpec:
    """The decoder program; with `decoder_prompt` (Mllama) it also takes `cross_spans [T, 2]`."""
    shapes: tuple[Any, ...] = dynamic_shapes(max(max_num_tokens, 9), max(max_batch_size, 2))
    shapes = (*shapes, {0: shapes[4][0]})
    args = decoder_inputs(cache, dtype, device, block_size, (3, 4), (0, 2), (3, 2))
    check = decoder_inputs(cache, dtype, device, block_size, (5, 2), (1, 4), (1, 3))
    names: tuple[str, ...] = DECODER_INPUT_NAMES
    if decoder_prompt:  # with a request without an image (encoder length 0)
        args = (*args, cross_spans((3, 4), (3, 2), device))
        check = decoder_inputs(cache, dtype, device, block_size, (5, 0, 2), (1, 2, 4), (1, 2, 3))
        check = (*check, cross_spans((5, 0, 2), (1, 2, 3), device))
        shapes, names = (*shapes, {0: shapes[0][0]}), (*names, "cross_spans")
    return _spec(module, args, check, shapes, names, f"the decoder of {architecture}", architecture)


def _spec(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    check: tuple[torch.Tensor, ...],
    shapes: tuple[Any, ...],
    names: tuple[str, ...],
    what: str,
    architecture: str,
    directory: str = "",
) -> ProgramSpec:
    """An encoder-decoder program: kiln's own attention ops already, so no attention passes."""
    return ProgramSpec(
        module=module.eval(), args=args, dynamic_shapes=shapes, what=what, architecture=architecture,
        directory=directory, input_names=names, check_inputs=check, passes=False,
    )  # fmt: skip
