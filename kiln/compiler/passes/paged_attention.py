"""Replace every captured attention site with the paged-attention op."""

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


def paged_attention(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """attention_site(q, k, v, layer, ...) -> paged_attention(q, k, v, kv_cache, metadata..., layer, ...)."""
    module = copy_graph(program)
    graph = module.graph
    inputs = user_input_nodes(program, graph, context.input_names)
    sites = nodes_calling(graph, torch.ops.kiln.attention_site.default)
    for site in sites:
        q, k, v, layer, scale, sliding_window, softcap = site.args
        metadata = [
            inputs[name] for name in ("kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc")
        ]
        call = replace_with_call(
            graph,
            site,
            torch.ops.kiln.paged_attention.default,
            (q, k, v, *metadata, layer, scale, sliding_window, softcap),
        )
        if context.kv_scales is not None:  # a narrow cache: this layer's scales, as graph constants
            k_scale, v_scale = context.kv_scales[int(layer)]  # type: ignore[arg-type]
            call.kwargs = {"k_scale": float(k_scale), "v_scale": float(v_scale)}
    graph.lint()
    module.recompile()
    return PassResult(program._update(module, program.graph_signature), len(sites))
