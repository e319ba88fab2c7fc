"""Make sure no attention site survived the rewrite."""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401
from kiln.compiler.passes.context import PassContext, PassResult, nodes_calling


def check_attention_rewritten(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """Each layer now reads and writes the paged KV cache."""
    graph = program.graph_module.graph
    left = nodes_calling(graph, torch.ops.kiln.attention_site.default)
    paged = nodes_calling(graph, torch.ops.kiln.paged_attention.default)
    paged += nodes_calling(graph, torch.ops.kiln.paged_attention_limits.default)
    if left or len(paged) != context.num_layers:
        raise RuntimeError(
            f"paged-attention rewrite incomplete: {len(left)} site(s) left, {len(paged)} paged op(s) "
            f"for {context.num_layers} layers"
        )
    return PassResult(program)
