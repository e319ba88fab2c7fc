"""Replace every captured attention site with the paged-attention op."""

from __future__ import annotations

import torch

import kiln.kernels  # noqa: F401
from kiln.compiler.passes.context import PassContext, copy_graph, nodes_calling, user_input_nodes


def paged_attention(program: torch.export.ExportedProgram, context: PassContext) -> torch.export.ExportedProgram:
    """attention_site(q, k, v, layer, ...) -> paged_attention(q, k, v, kv_cache, metadata..., layer, ...)."""
    module = copy_graph(program)
    graph = module.graph
    inputs = user_input_nodes(program, graph, context.input_names)
    for site in nodes_calling(graph, torch.ops.kiln.attention_site.default):
        q, k, v, layer, scale, sliding_window, softcap = site.args
        with graph.inserting_before(site):
            paged = graph.call_function(
                torch.ops.kiln.paged_attention.default,
                (
                    q,
                    k,
                    v,
                    inputs["kv_cache"],
                    inputs["slot_mapping"],
                    inputs["block_tables"],
                    inputs["seq_lens"],
                    inputs["query_start_loc"],
                    layer,
                    scale,
                    sliding_window,
                    softcap,
                ),
            )
        paged.meta = dict(site.meta)
        site.replace_all_uses_with(paged)
        graph.erase_node(site)
    graph.lint()
    module.recompile()
    return program._update(module, program.graph_signature)
