"""Compute matrix products over a contraction of length one as elementwise products.

    bmm(a [B, M, 1], b [B, 1, N])  ->  a * b        (likewise mm and matmul)

transformers' rotary embedding computes its angles as `inv_freq[:, None] @ positions[None, :]`,
an outer product, which torch 2.11 exports as a batched matrix product: one cuBLAS SGEMM launch
per step (3.4 us in a profile of a Llama-3.2-1B decode step on an H100) that Inductor cannot fuse. A product over
one term is that term, rounded once either way, so the values are identical; as a multiplication
Inductor folds it into the kernel computing cos and sin.
"""

from __future__ import annotations

import torch

from kiln.compiler.passes.context import PassContext, PassResult, rewrite_matches

aten = torch.ops.aten
PRODUCTS = (aten.bmm.default, aten.mm.default, aten.matmul.default)


def _outer(node: torch.fx.Node) -> bool | None:
    """True when node multiplies a [..., M, 1] by a [..., 1, N] of one floating dtype."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args):
        return None
    a, b = (arg.meta.get("val") for arg in node.args)  # type: ignore[union-attr]
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dtype != b.dtype:
        return None
    if a.dim() < 2 or b.dim() < 2 or not a.dtype.is_floating_point:
        return None
    if not (isinstance(a.shape[-1], int) and isinstance(b.shape[-2], int) and a.shape[-1] == b.shape[-2] == 1):
        return None
    return True


def outer_products(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """bmm / mm / matmul with a contraction of length one -> mul (broadcast)."""

    def rewrite(graph: torch.fx.Graph, node: torch.fx.Node, found: bool) -> None:
        node.target = aten.mul.Tensor  # same arguments, same result shape by broadcasting

    result = PassResult(program)
    for target in PRODUCTS:
        result = result.then(rewrite_matches(result.program, target, _outer, rewrite))
    return result


__all__ = ["outer_products"]
