"""Give paged attention a per-query key bound where the program takes `attend_end` (Gemma 3 images)."""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    copy_graph,
    nodes_calling,
    replace_with_call,
    user_input_nodes,
)

LIMITS_INPUT = "attend_end"


def image_attention_limits(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """paged_attention(...) -> paged_attention_limits(..., attend_end, ...) when the program has attend_end."""
    if LIMITS_INPUT not in context.input_names:
        return PassResult(program)
    module = copy_graph(program)
    graph = module.graph
    limits = user_input_nodes(program, graph, context.input_names)[LIMITS_INPUT]
    sites = nodes_calling(graph, torch.ops.kiln.paged_attention.default)
    for node in sites:
        q, k, v, cache, slots, tables, lens, starts, layer, scale, window, softcap = node.args
        replace_with_call(
            graph,
            node,
            torch.ops.kiln.paged_attention_limits.default,
            (q, k, v, cache, slots, tables, lens, starts, limits, layer, scale, window, softcap),
        )
    graph.lint()
    module.recompile()
    return PassResult(program._update(module, program.graph_signature), len(sites))
