"""Tell each paged-attention call which weight is read right after it, so it can prefetch it.

    attn = kiln.paged_attention(q, k, v, ...);  o = kiln.linear(attn.reshape(...), W_o, ...)
      -> attn = kiln.paged_attention(q, k, v, ..., prefetch=W_o)

At decode, attention is a short chain of dependent loads that leaves the memory bus idle for
microseconds while the output projection waits; given the projection's weight (a constant), the
decode kernels bring its first bytes into L2 meanwhile (`kiln.kernels.triton.decode`). Only an
attention output whose single path through views ends in a `kiln::linear` with a constant
weight gets one, so CUDA fp16/bf16 programs only (needs `small_batch_linear` before it).
"""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import PassContext, real_users, rewrite_matches

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten._unsafe_view.default)
PREFETCH_ARG = 12  # kiln.paged_attention(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens,
#                                          query_start_loc, layer, scale, sliding_window, softcap, prefetch)


def _next_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The constant weight of the kiln.linear that reads this attention call's output through views."""
    if node.kwargs or len(node.args) > PREFETCH_ARG:
        return None
    current = node
    while True:
        users = real_users(current)
        if len(users) != 1:
            return None
        (user,) = users
        if user.target in VIEWS and user.args[0] is current:
            current = user
            continue
        if user.target != torch.ops.kiln.linear.default or user.args[0] is not current:
            return None
        args = list(user.args) + [None, False][len(user.args) - 2 :]
        weight, constant = args[1], args[3]
        return weight if isinstance(weight, torch.fx.Node) and constant is True else None


def prefetch_output_weights(
    program: torch.export.ExportedProgram, context: PassContext
) -> torch.export.ExportedProgram:
    """kiln.paged_attention(...) -> kiln.paged_attention(..., prefetch=<the next projection's weight>)."""

    def rewrite(graph: torch.fx.Graph, node: torch.fx.Node, weight: torch.fx.Node) -> None:
        node.args = (*node.args, weight)

    return rewrite_matches(program, torch.ops.kiln.paged_attention.default, _next_weight, rewrite)


__all__ = ["prefetch_output_weights"]
