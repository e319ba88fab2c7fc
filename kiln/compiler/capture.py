"""The text engine's program: a transformers causal LM behind kiln's packed-token signature, as a `ProgramSpec`."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from kiln.compiler.program_spec import CacheShape, ProgramSpec

# The engine program's inputs, in order. Every tensor is flat over the step's packed tokens
# (T), its sequences (B), or the cache; see kiln.kernels.reference for the meaning of each.
INPUT_NAMES = (
    "input_ids",  # [T] int64
    "positions",  # [T] int64
    "slot_mapping",  # [T] int64
    "block_tables",  # [B, max_blocks] int32
    "seq_lens",  # [B] int32
    "query_start_loc",  # [B + 1] int32
    "logits_indices",  # [N] int64: the packed tokens whose next-token logits are returned
    "kv_cache",  # [layers, 2, blocks, block_size, kv_heads, head_dim]
)


class PackedCausalLM(nn.Module):
    """Calls the unmodified model on one row of packed tokens; returns logits [N, vocab]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

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
    ) -> torch.Tensor:
        # The metadata inputs are not used here: the paged-attention pass wires them in.
        given = {"input_ids": input_ids[None]}
        return causal_lm_logits(self.model, self._keeps_logits, given, positions, logits_indices)


def causal_lm_logits(
    model: nn.Module,
    keeps_logits: bool,
    given: dict[str, torch.Tensor],
    positions: torch.Tensor,
    logits_indices: torch.Tensor,
) -> torch.Tensor:
    """The causal LM's logits [N, vocab] at `logits_indices` of one packed row (`given`: its input_ids or
    inputs_embeds); with `keeps_logits` (its forward takes `logits_to_keep`), only those rows are projected."""
    if keeps_logits:
        out = model(**given, position_ids=positions[None], use_cache=False, logits_to_keep=logits_indices)
        return out.logits[0]
    out = model(**given, position_ids=positions[None], use_cache=False)
    return out.logits[0].index_select(0, logits_indices)


def step_inputs(
    cache: CacheShape,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    cached: tuple[int, ...],
    new: tuple[int, ...],
) -> tuple[torch.Tensor, ...]:
    """Program inputs for one step: sequence i has `cached[i]` tokens in the cache and `new[i]` new ones.

    Each sequence gets its own blocks, in a scrambled order; the cache holds random values, so
    reads through the block tables matter. Tables are at least two blocks wide: torch.export would
    specialise a dimension traced at size 1.
    """
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = max(2, *(-(-(c + n) // block_size) for c, n in zip(cached, new)))
    num_blocks = blocks_per_seq * len(new)
    block_tables = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(len(new), blocks_per_seq)
    spans = [torch.arange(c, c + n) for c, n in zip(cached, new)]
    slots = torch.cat(
        [block_tables[i, span // block_size].long() * block_size + span % block_size for i, span in enumerate(spans)]
    )
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    tensors = (
        torch.randint(0, 8, (sum(new),), generator=gen),
        torch.cat(spans),
        slots,
        block_tables,
        torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32),
        starts,
        starts[1:].long() - 1,
        torch.randn(cache.num_layers, 2, num_blocks, block_size, cache.num_kv_heads, cache.head_dim, generator=gen).to(
            dtype
        ),
    )
    return tuple(t.to(device) for t in tensors)


def example_inputs(
    cache: CacheShape, dtype: torch.dtype, device: torch.device, block_size: int
) -> tuple[torch.Tensor, ...]:
    """The step torch.export traces: two fresh prompts of 3 and 5 tokens."""
    return step_inputs(cache, dtype, device, block_size, cached=(0, 0), new=(3, 5))


def mixed_step_inputs(
    cache: CacheShape, dtype: torch.dtype, device: torch.device, block_size: int
) -> tuple[torch.Tensor, ...]:
    """A prompt chunk after a cached prefix (3 cached + 4 new) beside a decode (6 + 1)."""
    return step_inputs(cache, dtype, device, block_size, cached=(3, 6), new=(4, 1))


def dynamic_shapes(max_num_tokens: int, max_batch_size: int) -> tuple[dict[int, object], ...]:
    tokens = torch.export.Dim("tokens", min=1, max=max_num_tokens)
    seqs = torch.export.Dim("seqs", min=1, max=max_batch_size)
    max_blocks = torch.export.Dim("max_blocks", min=1)
    logits = torch.export.Dim("logits", min=1, max=max_num_tokens)
    blocks = torch.export.Dim("blocks", min=1)
    return (
        {0: tokens},
        {0: tokens},
        {0: tokens},
        {0: seqs, 1: max_blocks},
        {0: seqs},
        {0: seqs + 1},
        {0: logits},
        {2: blocks},
    )


def text_spec(
    model: nn.Module,
    cache: CacheShape,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
    max_num_tokens: int,
    max_batch_size: int,
    architecture: str,
) -> ProgramSpec:
    """The text engine's program: dynamic token, sequence and cache sizes, verified on a mixed step."""
    return ProgramSpec(
        module=PackedCausalLM(model).eval(),
        args=example_inputs(cache, dtype, device, block_size),
        dynamic_shapes=dynamic_shapes(max(max_num_tokens, 9), max(max_batch_size, 2)),
        what=architecture,
        architecture=architecture,
        input_names=INPUT_NAMES,
        check_inputs=mixed_step_inputs(cache, dtype, device, block_size),
        cache=cache,
    )
