"""Tell each paged-attention call which weight is read right after it, so it can prefetch it.

    attn = kiln.paged_attention(q, k, v, ...);  o = kiln.linear(attn.reshape(...), W_o, ...)
    ... the next kiln.linear in the graph: (..., W_next, ...)
      -> attn = kiln.paged_attention(q, k, v, ..., prefetch=W_o, prefetch_next=W_next)

At decode, attention is a short chain of dependent loads that leaves the memory bus idle for
microseconds while the output projection waits; given the projection's weight (a constant), the
decode kernels bring its first bytes into L2 meanwhile (`kiln.kernels.triton.decode`). Only an
attention output whose single path through views ends in a `kiln::linear` with a constant
weight gets one, so CUDA fp16/bf16 programs only (needs `small_batch_linear` before it).
"""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import PassContext, PassResult, real_users, rewrite_matches

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten._unsafe_view.default)
PREFETCH_ARG = 12  # kiln.paged_attention(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens,
#                                 query_start_loc, layer, scale, sliding_window, softcap, prefetch, prefetch_next)


def _constant_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The weight of a kiln.linear call when it is marked constant."""
    args = list(node.args) + [None, False][len(node.args) - 2 :]
    weight, constant = args[1], args[3]
    return weight if isinstance(weight, torch.fx.Node) and constant is True else None


def _following_weight(linear: torch.fx.Node) -> torch.fx.Node | None:
    """The constant weight of the first kiln.linear after `linear` in the graph (the next one to run)."""
    node = linear.next
    while node.op != "root":
        if node.op == "call_function" and node.target == torch.ops.kiln.linear.default:
            return _constant_weight(node)
        node = node.next
    return None


def _next_weights(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None] | None:
    """The constant weight of the kiln.linear that reads this attention call's output through views,
    and the next projection's."""
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
        weight = _constant_weight(user)
        return None if weight is None else (weight, _following_weight(user))


def prefetch_output_weights(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """kiln.paged_attention(...) -> kiln.paged_attention(..., prefetch=W_o, prefetch_next=W_next)."""

    def rewrite(
        graph: torch.fx.Graph, node: torch.fx.Node, weights: tuple[torch.fx.Node, torch.fx.Node | None]
    ) -> None:
        node.args = (*node.args, *weights)

    return rewrite_matches(program, torch.ops.kiln.paged_attention.default, _next_weights, rewrite)


__all__ = ["prefetch_output_weights"]
