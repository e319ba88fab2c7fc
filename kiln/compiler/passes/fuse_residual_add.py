"""Add the residual stream inside the projection that produces the update.

    h = residual + kiln.linear(x, W)          (o_proj, down_proj of a pre-norm decoder layer)
      -> h = kiln.linear(x, W, residual=residual)

The linear's kernel adds the residual in its epilogue, rounding as the two ops do, so the add
costs no launch of its own. Together with `fuse_rms_norm`, which moves the next RMSNorm into the
following projection, the add + RMSNorm kernel between two projections disappears. Only a linear
whose single user is the add, with the add's exact shape and dtype, is rewritten.
"""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    real_users,
    replace_with_call,
    rewrite_matches,
)

ADD = torch.ops.aten.add.Tensor
RESIDUAL_ARG = 4  # kiln.linear / kiln.silu_mul_linear: (x, weight, bias, constant_weight, residual)


def _linear_ops() -> tuple[object, ...]:
    return (torch.ops.kiln.linear.default, torch.ops.kiln.silu_mul_linear.default)


def _split(add: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(linear, residual) when `add` adds a fusable kiln linear's output to another tensor."""
    if add.kwargs or len(add.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in add.args):
        return None
    for linear, residual in (add.args, reversed(add.args)):
        assert isinstance(linear, torch.fx.Node) and isinstance(residual, torch.fx.Node)
        if linear.target not in _linear_ops() or len(real_users(linear)) != 1 or linear.kwargs:
            continue
        if len(linear.args) > RESIDUAL_ARG and linear.args[RESIDUAL_ARG] is not None:
            continue
        out, res, total = (n.meta.get("val") for n in (linear, residual, add))
        if not all(isinstance(v, torch.Tensor) for v in (out, res, total)):
            continue
        assert isinstance(out, torch.Tensor) and isinstance(res, torch.Tensor) and isinstance(total, torch.Tensor)
        if out.shape == res.shape == total.shape and out.dtype == res.dtype == total.dtype:
            return linear, residual
    return None


def fuse_residual_add(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """residual + kiln.linear(x, W) -> kiln.linear(x, W, residual=residual) (the add in the epilogue)."""

    def rewrite(graph: torch.fx.Graph, add: torch.fx.Node, split: tuple[torch.fx.Node, torch.fx.Node]) -> None:
        linear, residual = split
        args = list(linear.args)
        args += [None, None, None, False][len(args) : RESIDUAL_ARG]  # bias, constant_weight defaults
        replace_with_call(graph, add, linear.target, (*args, residual))
        graph.erase_node(linear)

    return rewrite_matches(program, ADD, _split, rewrite)


__all__ = ["fuse_residual_add"]
