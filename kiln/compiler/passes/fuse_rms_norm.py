"""Compute a Llama-style RMSNorm inside the projection that reads it.

    y = weight * (x.float() * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    kiln.linear(y, W)  ->  kiln.rms_norm_linear(x, weight, eps, W)

That is transformers' RMSNorm for Llama, Mistral, Qwen2/3, Phi-3 and their kin, matched op by op
on the exported graph; other norms (Gemma's `1 + weight`, LayerNorm) are left alone. The
projection's kernel reads x once for the statistics and normalises each tile as it loads it,
rounded as the module rounds, so the norm costs no launch of its own. Every intermediate must feed
only the next op of the pattern (the norm's output only the projection), so nothing else needs
the normalised tensor. Needs `small_batch_linear` before it (and `fuse_projections`, so that q/k/v
and gate/up each read the norm once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    drop_metadata_checks,
    real_users,
    replace_with_call,
    rewrite_matches,
)

aten = torch.ops.aten
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class _Norm:
    x: torch.fx.Node  # the norm's input (half precision)
    weight: torch.fx.Node  # [K] parameter
    eps: float
    nodes: tuple[torch.fx.Node, ...]  # the pattern's nodes, output last


def _only(node: object, target: object, users: int = 1) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and node.target == target and len(real_users(node)) == users:
        return node
    return None


def _cast(node: object, dtype: torch.dtype | None, users: int = 1) -> torch.fx.Node | None:
    """A `.to(dtype)` node (aten.to.dtype, or _to_copy with only a dtype)."""
    for target in (aten.to.dtype, aten._to_copy.default):
        cast = _only(node, target, users)
        if cast is None:
            continue
        wanted = cast.args[1] if target == aten.to.dtype and len(cast.args) > 1 else cast.kwargs.get("dtype")
        extra = set(cast.kwargs) - {"dtype"}
        if extra or (target == aten.to.dtype and len(cast.args) != 2) or (dtype is not None and wanted != dtype):
            continue
        return cast
    return None


def _pair(node: torch.fx.Node) -> tuple[object, object]:
    a, b = node.args[:2]
    return a, b


def match_rms_norm(y: object) -> _Norm | None:
    """The RMSNorm whose output is y, or None."""
    out = _only(y, aten.mul.Tensor)
    if out is None or out.kwargs:
        return None
    for weight, rounded in (_pair(out), reversed(_pair(out))):
        wv = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        if not isinstance(weight, torch.fx.Node) or weight.op != "placeholder" or not isinstance(wv, torch.Tensor):
            continue
        to_half = _cast(rounded, None)
        if to_half is None or to_half.args[0] is None:
            continue
        scaled = _only(to_half.args[0], aten.mul.Tensor)
        if scaled is None:
            continue
        for x_float, inv in (_pair(scaled), reversed(_pair(scaled))):
            rsqrt = _only(inv, aten.rsqrt.default)
            add = _only(rsqrt.args[0], aten.add.Tensor) if rsqrt is not None else None
            if add is None or not isinstance(add.args[1], float) or add.kwargs:
                continue
            mean = _only(add.args[0], aten.mean.dim)
            if mean is None or mean.args[1:] not in (([-1], True), ((-1,), True)) or mean.kwargs:
                continue
            square = _only(mean.args[0], aten.pow.Tensor_Scalar)
            if square is None or square.args[1] != 2 or square.args[0] is not x_float:
                continue
            cast_up = _cast(x_float, torch.float32, users=2)
            if cast_up is None:
                continue
            x = cast_up.args[0]
            xv = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
            if not isinstance(x, torch.fx.Node) or not isinstance(xv, torch.Tensor) or xv.dtype not in HALF:
                continue
            yv = out.meta.get("val")
            rounded_dtype = to_half.args[1] if len(to_half.args) > 1 else to_half.kwargs.get("dtype")
            if rounded_dtype != xv.dtype or wv.dtype != xv.dtype or wv.shape != (xv.shape[-1],):
                continue
            if not isinstance(yv, torch.Tensor) or yv.dtype != xv.dtype:
                continue
            assert rsqrt is not None
            nodes = (cast_up, square, mean, add, rsqrt, scaled, to_half, out)
            return _Norm(x=x, weight=weight, eps=float(add.args[1]), nodes=nodes)
    return None


def _match(node: torch.fx.Node) -> _Norm | None:
    """The RMSNorm a linear without a residual reads, if any (with a residual, the norm's input is
    ready only after the residual add)."""
    residual = node.args[4] if len(node.args) > 4 else node.kwargs.get("residual")
    if node.kwargs or residual is not None:
        return None
    return match_rms_norm(node.args[0])


def fuse_rms_norm(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """kiln.linear(rms_norm(x) * w, W) -> kiln.rms_norm_linear(x, w, eps, W) (no norm kernel)."""

    def rewrite(graph: torch.fx.Graph, node: torch.fx.Node, norm: _Norm) -> None:
        _, weight, bias, constant = (list(node.args) + [None, None, None, False][len(node.args) :])[:4]
        fused = (norm.x, norm.weight, norm.eps, weight, bias, constant)
        replace_with_call(graph, node, torch.ops.kiln.rms_norm_linear.default, fused)
        drop_metadata_checks(graph, list(norm.nodes))
        for dead in reversed(norm.nodes):
            graph.erase_node(dead)

    return rewrite_matches(program, torch.ops.kiln.linear.default, _match, rewrite)


__all__ = ["fuse_rms_norm", "match_rms_norm"]
