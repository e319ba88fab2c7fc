"""gather_before_norm on captured tiny checkpoints: the final norm runs on the logits rows only,
and every output is unchanged bit for bit (the norm works row by row)."""

from __future__ import annotations

import pytest
import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.capture import step_inputs
from kiln.compiler.passes import PASSES
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.gather_before_norm import gather_before_norm

INDEX = torch.ops.aten.index.Tensor


def _without(program, context, skipped):
    for graph_pass in PASSES:
        if graph_pass is not skipped:
            program = graph_pass(program, context).program
    return program


@pytest.mark.parametrize(
    ("family", "architecture", "moved"),
    [("llama", "LlamaForCausalLM", True), ("qwen2", "Qwen2ForCausalLM", True), ("gemma2", "Gemma2ForCausalLM", False)],
)
def test_final_norm_follows_the_row_pick_and_outputs_agree(checkpoints, family, architecture, moved):
    program, shape, context = capture_tiny(checkpoints(family), architecture, torch.bfloat16)
    before = _without(program, context, gather_before_norm)
    result = gather_before_norm(before, context)
    after = result.program
    assert result.sites == (1 if moved else 0)
    (pick,) = nodes_calling(after.graph, INDEX)
    if moved:  # the residual stream's rows are picked, and the norm's float32 cast reads them
        assert pick.args[0].target == torch.ops.aten.add.Tensor
        assert [u.target for u in pick.users if u.target != torch.ops.aten._assert_tensor_metadata.default] == [
            torch.ops.aten.to.dtype
        ]
    else:  # Gemma's norm is not Llama's RMSNorm: left alone
        assert after is before
    for new in ((5,), (1, 1, 1), (2, 6)):
        inputs = step_inputs(shape, torch.bfloat16, torch.device("cpu"), 4, cached=(2,) * len(new), new=new)
        with torch.no_grad():
            want = before.module()(*inputs)
            got = after.module()(*inputs)
        assert torch.equal(got, want), new
