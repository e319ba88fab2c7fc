"""fuse_silu_mul, fuse_residual_add, fuse_rms_norm and fuse_rope on captured tiny checkpoints (bf16 on CPU).

The passes rewrite `kiln::linear` nodes, which `small_batch_linear` makes only for CUDA half
programs; here every linear is forced through `kiln::linear` and the fused ops run their PyTorch
path, which must give the unfused program's outputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.capture import step_inputs
from kiln.compiler.passes import FUSED_LINEAR_PASSES, PASSES, active_passes, run_passes
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.fuse_gated_activation import fuse_gated_activation
from kiln.compiler.passes.fuse_residual_add import fuse_residual_add
from kiln.compiler.passes.fuse_rms_norm import fuse_rms_norm
from kiln.compiler.passes.fuse_rope import fuse_rope
from kiln.compiler.passes.fuse_silu_mul import fuse_silu_mul
from kiln.compiler.passes.small_batch_linear import rewrite_linears
from kiln.config import BuildConfig

kiln_ops = torch.ops.kiln


@pytest.fixture(scope="module", params=[("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def forced(request, checkpoints):
    """(program with every linear as kiln.linear, shape, context), after the standard passes."""
    family, architecture = request.param
    program, shape, context = capture_tiny(checkpoints(family), architecture, torch.bfloat16)
    program = run_passes(program, context).program  # CPU: the fusion passes change nothing yet
    assert not nodes_calling(program.graph, kiln_ops.linear.default)
    return rewrite_linears(program, lambda node: True).program, shape, context


def _count(program: torch.export.ExportedProgram, op) -> int:
    return len(nodes_calling(program.graph, op.default))


def _outputs(program: torch.export.ExportedProgram, shape) -> list[torch.Tensor]:
    outs = []
    for new in ((3,), (1, 1, 1), (2, 5)):  # prefill, decode rows, a mix
        inputs = step_inputs(shape, torch.bfloat16, torch.device("cpu"), 4, cached=(2,) * len(new), new=new)
        with torch.no_grad():
            outs.append(program.module()(*inputs))
    return outs


def test_each_layer_loses_its_elementwise_and_norm_ops(forced):
    program, shape, context = forced
    layers = shape.num_layers
    step = fuse_silu_mul(program, context)
    silu = step.program
    assert step.sites == layers
    assert _count(silu, kiln_ops.silu_mul_linear) == layers
    assert not nodes_calling(silu.graph, torch.ops.aten.silu.default)
    step = fuse_residual_add(silu, context)
    residual = step.program
    assert step.sites == 2 * layers
    # o_proj and down_proj of every layer add the residual in their epilogue
    with_residual = [
        n
        for n in residual.graph.nodes
        if n.target in (kiln_ops.linear.default, kiln_ops.silu_mul_linear.default)
        and len(n.args) > 4
        and n.args[4] is not None
    ]
    assert len(with_residual) == 2 * layers
    step = fuse_rms_norm(residual, context)
    normed = step.program
    assert step.sites == 2 * layers + 1
    # input_layernorm -> qkv, post_attention_layernorm -> gate_up, and the final norm (on the
    # logits rows, picked before it by gather_before_norm) -> lm_head
    assert _count(normed, kiln_ops.rms_norm_linear) == 2 * layers + 1
    assert not nodes_calling(normed.graph, torch.ops.aten.rsqrt.default)
    assert len(nodes_calling(normed.graph, torch.ops.aten.neg.default)) == 2 * layers  # rotate_half of q and k
    step = fuse_rope(normed, context)
    roped = step.program
    assert step.sites == layers
    # each layer's normed q/k/v projection rotates its q and k heads itself
    assert _count(roped, kiln_ops.linear_rope) == layers
    assert _count(roped, kiln_ops.rms_norm_linear) == layers + 1
    assert all(call.args[4] is not None for call in nodes_calling(roped.graph, kiln_ops.linear_rope.default))
    assert not nodes_calling(roped.graph, torch.ops.aten.neg.default)
    step = fuse_gated_activation(roped, context)
    gated = step.program
    assert step.sites == layers
    # each layer's gate/up projection writes silu(gate) * up, and its down projection is plain again
    assert _count(gated, kiln_ops.linear_silu_mul) == layers
    assert _count(gated, kiln_ops.silu_mul_linear) == 0
    downs = [
        n
        for n in nodes_calling(gated.graph, kiln_ops.linear.default)
        if n.args[0].target == kiln_ops.linear_silu_mul.default
    ]
    assert len(downs) == layers and all(n.args[4] is not None for n in downs)  # the residual stays with it


def test_fused_program_gives_the_same_outputs(forced):
    program, shape, context = forced
    fused = program
    for graph_pass in (fuse_silu_mul, fuse_residual_add, fuse_rms_norm, fuse_rope, fuse_gated_activation):
        fused = graph_pass(fused, context).program
    assert _count(fused, kiln_ops.linear_rope) == _count(fused, kiln_ops.linear_silu_mul) == shape.num_layers
    for want, got in zip(_outputs(program, shape), _outputs(fused, shape)):
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_passes_leave_programs_without_kiln_linears_alone(forced):
    program, shape, context = forced
    plain = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    passes = [fuse_silu_mul, fuse_residual_add, fuse_rms_norm, fuse_rope, fuse_gated_activation]
    for graph_pass in passes:
        result = graph_pass(plain, context)
        assert result.program is plain and result.sites == 0
    assert FUSED_LINEAR_PASSES == passes


def test_fused_linear_passes_run_unless_turned_off():
    assert active_passes(BuildConfig())[-len(FUSED_LINEAR_PASSES) :] == FUSED_LINEAR_PASSES
    assert active_passes(BuildConfig())[: len(PASSES)] == PASSES
    assert not set(FUSED_LINEAR_PASSES) & set(active_passes(BuildConfig(fused_linears=False)))
    assert active_passes(BuildConfig(fused_linears=False)) == PASSES
    without_rope = active_passes(BuildConfig(fuse_rope=False))
    assert fuse_rope not in without_rope
    assert without_rope[len(PASSES) :] == [p for p in FUSED_LINEAR_PASSES if p is not fuse_rope]
    assert fuse_rope not in active_passes(BuildConfig(fused_linears=False, fuse_rope=True))


@pytest.mark.parametrize(
    ("family", "architecture", "rotated"),
    [
        ("gemma2", "Gemma2ForCausalLM", True),  # Gemma's norm is not Llama's: the rotation fuses into kiln.linear
        ("qwen3", "Qwen3ForCausalLM", False),  # q/k are normalised per head before the rotation
        ("phi3", "Phi3ForCausalLM", False),  # partial rotary: part of each head passes through
    ],
)
def test_fuse_rope_takes_only_the_full_rotate_half_pattern(checkpoints, family, architecture, rotated):
    program, shape, context = capture_tiny(checkpoints(family), architecture, torch.bfloat16)
    forced = rewrite_linears(run_passes(program, context).program, lambda node: True).program
    fused = forced
    for graph_pass in FUSED_LINEAR_PASSES:
        fused = graph_pass(fused, context).program
    assert _count(fused, kiln_ops.linear_rope) == (shape.num_layers if rotated else 0)
    for want, got in zip(_outputs(forced, shape), _outputs(fused, shape)):
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_run_passes_follows_the_build_config_of_its_context(checkpoints):
    program, _, context = capture_tiny(checkpoints("llama"), "LlamaForCausalLM")
    assert context.build == BuildConfig()
    for build in (BuildConfig(), BuildConfig(fused_linears=False), BuildConfig(fuse_rope=False)):
        seen: list[tuple[str, int]] = []
        on_pass = lambda *done, seen=seen: seen.append(done)  # noqa: E731
        run = run_passes(program, dataclasses.replace(context, build=build), on_pass=on_pass)
        assert [name for name, _ in seen] == [p.__name__ for p in active_passes(build)]
        assert run.changes == {name: sites for name, sites in seen if sites}  # only the passes that changed it
