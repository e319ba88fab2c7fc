"""fuse_projections on captured tiny models: same outputs, fewer linears, a valid program; shared weights left alone."""

from __future__ import annotations

import io

import pytest
import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.capture import example_inputs, mixed_step_inputs, step_inputs
from kiln.compiler.passes import PASSES, PassContext, run_passes
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.fuse_projections import fuse_projections

LINEAR = torch.ops.aten.linear.default


def _capture(checkpoints, family: str, architecture: str):
    return capture_tiny(checkpoints(family), architecture)


@pytest.fixture(scope="module", params=[("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def captured(request, checkpoints):
    return (request.param[0], *_capture(checkpoints, *request.param))


def _linears(program: torch.export.ExportedProgram) -> int:
    return len(nodes_calling(program.graph, LINEAR))


def test_fused_program_keeps_its_outputs(captured):
    family, program, shape, context = captured
    result = fuse_projections(program, context)
    fused = result.program
    assert result.sites == 2 * shape.num_layers  # two groups per layer
    # per layer: q, k, v -> one linear (2 fewer) and gate, up -> one (1 fewer)
    assert _linears(program) - _linears(fused) == 3 * shape.num_layers
    inputs = example_inputs(shape, torch.float32, torch.device("cpu"), 4)
    with torch.no_grad():
        before, after = program.module()(*inputs), fused.module()(*inputs)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5), (before - after).abs().max()
    # the input program is untouched
    assert _linears(program) == 7 * shape.num_layers + 1


def test_pass_leaves_the_sizes_symbolic(captured):
    """No guard, replacement or range change in the shared shape environment; other token counts still run."""
    _, program, shape, context = captured
    env = next(n.meta["val"] for n in program.graph.nodes if n.op == "placeholder").fake_mode.shape_env
    before = (len(env.guards), dict(env.replacements), dict(env.var_to_range))
    fused = fuse_projections(program, context).program
    assert (len(env.guards), dict(env.replacements), dict(env.var_to_range)) == before
    for new in ((2,), (5,), (3, 9)):
        inputs = step_inputs(shape, torch.float32, torch.device("cpu"), 4, cached=(0,) * len(new), new=new)
        with torch.no_grad():
            want, got = program.module()(*inputs), fused.module()(*inputs)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_fused_parameters_replace_the_old_ones(captured):
    family, program, shape, context = captured
    fused = fuse_projections(program, context).program
    state = fused.state_dict
    gone = (".q_proj.weight", ".k_proj.weight", ".gate_proj.weight", ".up_proj.weight", ".k_proj.bias", ".v_proj.bias")
    assert not [name for name in state if name.endswith(gone)]
    qkv = state["model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.weight"]
    gate_up = state["model.model.layers.0.mlp.fused_gate_proj_up_proj.weight"]
    assert isinstance(qkv, torch.nn.Parameter) and tuple(qkv.shape) == (64 + 2 * 32, 64)
    assert tuple(gate_up.shape) == (2 * 128, 64)
    original = program.state_dict
    assert torch.equal(qkv[64:96], original["model.model.layers.0.self_attn.k_proj.weight"])
    if family == "qwen2":  # q/k/v biases are fused beside the weights
        bias = state["model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.bias"]
        assert torch.equal(bias[96:], original["model.model.layers.0.self_attn.v_proj.bias"])
        assert all(len(n.args) == 3 for n in nodes_calling(fused.graph, LINEAR) if "q_proj" in str(n.args[1]))
    targets = {spec.target for spec in fused.graph_signature.input_specs if spec.target is not None}
    assert targets == set(state) | set(fused.constants)


def test_fused_program_saves_and_loads(captured):
    _, program, shape, context = captured
    fused = fuse_projections(program, context).program
    buffer = io.BytesIO()
    torch.export.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    inputs = example_inputs(shape, torch.float32, torch.device("cpu"), 4)
    with torch.no_grad():
        assert torch.equal(loaded.module()(*inputs), fused.module()(*inputs))


def test_full_pipeline_keeps_outputs(captured):
    """All passes (paged attention, then fusion) against the attention-rewritten program without fusion."""
    _, program, shape, context = captured
    assert PASSES.index(fuse_projections) > [p.__name__ for p in PASSES].index("check_attention_rewritten")
    full = run_passes(program, context).program
    unfused = program
    for graph_pass in PASSES:
        if graph_pass is not fuse_projections:
            unfused = graph_pass(unfused, context).program
    inputs = mixed_step_inputs(shape, torch.float32, torch.device("cpu"), 4)
    cache_a, cache_b = inputs[-1].clone(), inputs[-1].clone()
    with torch.no_grad():
        got, want = full.module()(*inputs[:-1], cache_a), unfused.module()(*inputs[:-1], cache_b)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cache_a, cache_b, atol=1e-5, rtol=1e-5)
    assert not nodes_calling(full.graph, torch.ops.kiln.linear.default)  # CPU weights: no Triton linears


class _Shared(torch.nn.Module):
    """q/k/v-like linears of one input, but k's weight is also read elsewhere and v's is tied to another layer."""

    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(8, 8, bias=False)
        self.k = torch.nn.Linear(8, 4, bias=False)
        self.v = torch.nn.Linear(8, 4, bias=False)
        self.out = torch.nn.Linear(8, 4, bias=False)
        self.out.weight = self.v.weight  # tied
        self.a = torch.nn.Linear(8, 6, bias=True)
        self.b = torch.nn.Linear(8, 6, bias=False)  # same input as a, but no bias: another group

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scale = self.k.weight.sum()
        return torch.cat([q, k * scale, v, self.out(y), self.a(y), self.b(y)], dim=-1)


def test_shared_tied_and_mixed_bias_linears_are_left_alone():
    module = _Shared().eval()
    args = (torch.randn(3, 8), torch.randn(3, 8))
    program = torch.export.export(module, args)
    fused = fuse_projections(program, PassContext(architecture="Shared", num_layers=0)).program
    assert _linears(fused) == _linears(program)
    assert set(fused.state_dict) == set(program.state_dict)


def test_a_view_that_merges_dims_reads_a_contiguous_copy():
    class Merge(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.a(x).view(-1), self.b(x).view(-1)])

    module, x = Merge().eval(), torch.randn(2, 3, 8)
    fused = fuse_projections(torch.export.export(module, (x,)), PassContext(architecture="Merge", num_layers=0)).program
    assert _linears(fused) == 1 and len(nodes_calling(fused.graph, torch.ops.aten.clone.default)) == 2
    with torch.no_grad():
        assert torch.allclose(fused.module()(x), module(x), atol=1e-6)


def test_independent_pairs_fuse_per_input():
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2 = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5)
            self.b1, self.b2, self.b3 = (torch.nn.Linear(8, 4, bias=False) for _ in range(3))
            self.c = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = [self.a1(x), self.a2(x), self.b1(y), self.b2(y), self.b3(y), self.c(x + y)]
            return torch.cat([o.reshape(-1) for o in out])

    module = Two().eval()
    args = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    program = torch.export.export(module, args)
    fused = fuse_projections(program, PassContext(architecture="Two", num_layers=0)).program
    assert _linears(program) - _linears(fused) == 1 + 2
    assert "fused_a1_a2.bias" in fused.state_dict and "fused_b1_b2_b3.weight" in fused.state_dict
    with torch.no_grad():
        assert torch.allclose(fused.module()(*args), module(*args), atol=1e-6)


def test_fused_linears_that_are_program_outputs():
    class Heads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.a(x), self.b(x)

    module, x = Heads().eval(), torch.randn(4, 8)
    fused = fuse_projections(torch.export.export(module, (x,)), PassContext(architecture="Heads", num_layers=0)).program
    assert _linears(fused) == 1
    with torch.no_grad():
        for got, want in zip(fused.module()(x), module(x)):
            assert torch.allclose(got, want, atol=1e-6)
