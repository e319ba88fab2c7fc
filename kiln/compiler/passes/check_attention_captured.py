"""Refuse models whose attention bypassed transformers' attention interface."""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401
from kiln.compiler.passes.context import PassContext, PassResult, nodes_calling
from kiln.errors import UnsupportedModelError

_RAW_ATTENTION = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
)


def check_attention_captured(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """Every layer's attention went through kiln's attention function, exactly once."""
    graph = program.graph_module.graph
    raw = [n for op in _RAW_ATTENTION for n in nodes_calling(graph, op)]
    if raw:
        raise UnsupportedModelError(
            f"{context.architecture} computes attention outside transformers' attention interface "
            f"({len(raw)} raw scaled_dot_product_attention call(s)), so kiln cannot give it a paged KV cache"
        )
    sites = nodes_calling(graph, torch.ops.kiln.attention_site.default)
    if not sites:
        raise UnsupportedModelError(
            f"{context.architecture} computes attention in its own code instead of through transformers' attention "
            "interface, so kiln cannot give it a paged KV cache"
        )
    layers = sorted(int(n.args[3]) for n in sites)  # type: ignore[arg-type]
    if layers != list(range(context.num_layers)):
        raise UnsupportedModelError(
            f"{context.architecture}: expected one attention call per layer for {context.num_layers} layers, "
            f"captured layers {layers}"
        )
    return PassResult(program)
