"""Compute a gated MLP's activation in the gate/up projection instead of the down projection.

    gate_up = kiln.[rms_norm_]linear(x, ..., W_gate_up)
    down = kiln.silu_mul_linear(gate_up, W_down, ..., residual)
      -> act = kiln.linear_silu_mul(x, W_gate_up, ...)          [..., I]: silu(gate) * up
         down = kiln.linear(act, W_down, ..., residual)

After `fuse_silu_mul` the down projection's kernel computed silu(gate) * up while loading x: every
one of its programs read the whole 2I-wide gate/up row and recomputed the activation, which on an
H100 held Llama-3.2-1B's down projections at 78% of the copy bandwidth. The gate/up kernel instead
pairs each gate column with its up column at one row and writes only their product, rounded as
before; the down projection becomes a plain one reading I values. Only a gate/up projection whose
single user is the down projection is rewritten. Needs `fuse_silu_mul` (and `fuse_rms_norm`, to keep
the norm fused) before it.
"""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    projection_args,
    real_users,
    replace_with_call,
    rewrite_matches,
)

RESIDUAL_ARG = 4  # kiln.silu_mul_linear: (gate_up, weight, bias, constant_weight, residual)


def _projection(node: torch.fx.Node) -> torch.fx.Node | None:
    """The gate/up projection the down projection `node` reads, when nothing else reads it."""
    gate_up = node.args[0]
    if node.kwargs or not isinstance(gate_up, torch.fx.Node) or gate_up.kwargs or len(real_users(gate_up)) != 1:
        return None
    if gate_up.target == torch.ops.kiln.rms_norm_linear.default:
        return gate_up
    if gate_up.target == torch.ops.kiln.linear.default and (len(gate_up.args) <= 4 or gate_up.args[4] is None):
        return gate_up
    return None


def fuse_gated_activation(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """kiln.silu_mul_linear(kiln.linear(x, W1), W2) -> kiln.linear(kiln.linear_silu_mul(x, W1), W2)."""

    def rewrite(graph: torch.fx.Graph, down: torch.fx.Node, gate_up: torch.fx.Node) -> None:
        with graph.inserting_before(gate_up):
            act = graph.call_function(torch.ops.kiln.linear_silu_mul.default, projection_args(gate_up))  # type: ignore[arg-type]
        value = gate_up.meta.get("val")
        act.meta = dict(gate_up.meta)
        if isinstance(value, torch.Tensor):
            act.meta["val"] = value.new_empty(*value.shape[:-1], value.shape[-1] // 2)
        args = list(down.args) + [None, None, None, False, None][len(down.args) :]
        replace_with_call(graph, down, torch.ops.kiln.linear.default, (act, *args[1 : RESIDUAL_ARG + 1]))
        graph.erase_node(gate_up)

    return rewrite_matches(program, torch.ops.kiln.silu_mul_linear.default, _projection, rewrite)


__all__ = ["fuse_gated_activation"]
