"""Read a gated MLP's activation straight from the fused gate/up output inside the down projection.

    down = kiln.linear(silu(gate_up[..., :I]) * gate_up[..., I:], W)
      -> kiln.silu_mul_linear(gate_up, W)

The `silu * up` elementwise kernel (one launch per layer) disappears: the down projection's kernel
computes it while loading x, rounded as the two ops round. Needs `fuse_projections` (gate and up
in one output) and `small_batch_linear` (the down projection as `kiln::linear`) before it.
"""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import PassContext, PassResult, real_users, replace_with_call, rewrite_matches

SILU = torch.ops.aten.silu.default
MUL = torch.ops.aten.mul.Tensor
SLICE = torch.ops.aten.slice.Tensor


def _half(node: object) -> tuple[torch.fx.Node, int, int] | None:
    """(source, start, end) when node is a slice of the source's last dim."""
    if not isinstance(node, torch.fx.Node) or node.target != SLICE:
        return None
    source, dim, start, end = (list(node.args) + [0, None, None])[:4]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    if not isinstance(source, torch.fx.Node) or not isinstance(value, torch.Tensor) or len(node.args) > 4:
        return None
    if dim not in (-1, value.dim() - 1) or not isinstance(start, (int, type(None))):
        return None
    if not isinstance(end, (int, type(None))):
        return None
    return source, start or 0, end if end is not None and end < 2**62 else int(value.shape[-1])


def _gate_up(mul: object) -> torch.fx.Node | None:
    """The [gate | up] tensor when `mul` is silu(gate) * up over its two halves, each op used once."""
    if not isinstance(mul, torch.fx.Node) or mul.target != MUL or len(real_users(mul)) != 1 or mul.kwargs:
        return None
    a, b = mul.args
    silu, up = (a, b) if isinstance(a, torch.fx.Node) and a.target == SILU else (b, a)
    if not isinstance(silu, torch.fx.Node) or silu.target != SILU or len(real_users(silu)) != 1:
        return None
    gate, upper = _half(silu.args[0]), _half(up)
    if gate is None or upper is None or gate[0] is not upper[0]:
        return None
    source = gate[0]
    width = source.meta["val"].shape[-1]
    if gate[1:] != (0, width // 2) or upper[1:] != (width // 2, width) or width % 2:
        return None
    if source.meta["val"].stride(-1) != 1:
        return None
    return source


def fuse_silu_mul(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """kiln.linear(silu(gate) * up, W) -> kiln.silu_mul_linear([gate | up], W) (no elementwise kernel)."""

    def rewrite(graph: torch.fx.Graph, node: torch.fx.Node, source: torch.fx.Node) -> None:
        x, weight, bias, constant, *_ = list(node.args) + [None, False]
        replace_with_call(graph, node, torch.ops.kiln.silu_mul_linear.default, (source, weight, bias, constant))

    return rewrite_matches(program, torch.ops.kiln.linear.default, _match, rewrite)


def _match(node: torch.fx.Node) -> torch.fx.Node | None:
    """The fused [gate | up] output a linear without a residual reads through silu * up, if any."""
    residual = node.args[4] if len(node.args) > 4 else node.kwargs.get("residual")
    return _gate_up(node.args[0]) if residual is None else None


__all__ = ["fuse_silu_mul"]
