"""prefetch_output_weights: each attention call learns the output projection's weight; values unchanged."""

from __future__ import annotations

import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.capture import step_inputs
from kiln.compiler.passes import run_passes
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.prefetch_output_weights import prefetch_output_weights
from kiln.compiler.passes.small_batch_linear import rewrite_linears


def test_each_attention_call_gets_its_layers_output_weight(checkpoints):
    program, shape, context = capture_tiny(checkpoints("llama"), "LlamaForCausalLM", torch.bfloat16)
    program = run_passes(program, context).program  # CPU: no kiln.linear, so nothing to prefetch yet
    assert prefetch_output_weights(program, context).program is program
    forced = rewrite_linears(program, lambda node: True).program
    result = prefetch_output_weights(forced, context)
    rewritten = result.program
    assert result.sites == shape.num_layers
    calls = nodes_calling(rewritten.graph, torch.ops.kiln.paged_attention.default)
    assert len(calls) == shape.num_layers
    for layer, call in enumerate(calls):  # its output projection, then the (fused) gate/up projection
        assert call.args[-2].name == f"p_model_model_layers_{layer}_self_attn_o_proj_weight"
        assert call.args[-1].name == f"p_model_model_layers_{layer}_mlp_fused_gate_proj_up_proj_weight"
    for new in ((3,), (1, 1)):
        inputs = step_inputs(shape, torch.bfloat16, torch.device("cpu"), 4, cached=(2,) * len(new), new=new)
        with torch.no_grad():
            assert torch.equal(rewritten.module()(*inputs), forced.module()(*inputs))
