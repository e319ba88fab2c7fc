"""quantize_linears: every linear weight but the embedding's (and lm_head's, unless asked) becomes packed
int8/int4 parameters, and the program computes exactly what the dense one does on the dequantized weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.capture import example_inputs
from kiln.compiler.passes import QUANTIZATION_PASSES, active_passes, run_passes
from kiln.compiler.passes.context import PassContext, nodes_calling
from kiln.compiler.passes.quantize_linears import quantize_linears, quantized_layers, scale_dtype
from kiln.compiler.quantize.rtn import quantize, quantize_int8
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears

LINEAR = torch.ops.aten.linear.default
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def captured(checkpoints):
    return capture_tiny(checkpoints("llama"), "LlamaForCausalLM")


def _dequantized(program, bits, group_size=32):
    """The program with each projection weight replaced by its dequantized round-to-nearest weight."""
    state = dict(program.state_dict)
    for name, value in state.items():
        if name.split(".")[-2] in PROJECTIONS:
            dense = quantize(value, bits, group_size).dequantize(value.dtype)
            state[name] = torch.nn.Parameter(dense, requires_grad=False)
    return program._update(program.graph_module, program.graph_signature, state_dict=state)


def _run(program, shape):
    inputs = example_inputs(shape, torch.float32, torch.device("cpu"), 4)
    with torch.no_grad():
        return program.module()(*copy.deepcopy(inputs))


@pytest.mark.parametrize(("method", "bits"), [("int8_wo", 8), ("int4_wo", 4)])
def test_the_quantized_program_is_the_dense_one_on_dequantized_weights(captured, method, bits):
    program, shape, context = captured
    build = BuildConfig(quantization=method, group_size=32)
    assert active_passes(build)[-1] is quantize_linears
    run = run_passes(program, dataclasses.replace(context, build=build))
    quantized = run.program
    assert run.changes["quantize_linears"] == 4 * shape.num_layers  # fused q/k/v, o, fused gate/up, down
    want = run_passes(_dequantized(program, bits), context).program
    assert torch.equal(_run(quantized, shape), _run(want, shape))
    # no dense projection weight is left, the tied embedding / lm_head table stays dense
    state = quantized.state_dict
    assert not [name for name in state if name.endswith(".weight") and name.split(".")[-2].startswith("fused_")]
    assert not [name for name in state if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS]
    qkv = "model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj"
    assert state[f"{qkv}.qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert tuple(state[f"{qkv}.qweight"].shape) == (128, 64 if bits == 8 else 32)
    assert (f"{qkv}.zeros" in state) == (bits == 4)
    assert len(nodes_calling(quantized.graph, LINEAR)) == 1  # lm_head
    layers = quantized_layers(quantized)
    assert len(layers) == 7 * shape.num_layers and layers[0] == "model.model.layers.0.self_attn.q_proj.weight"
    targets = {spec.target for spec in quantized.graph_signature.input_specs if spec.target is not None}
    assert targets == set(state) | set(quantized.constants)


def test_lm_head_is_quantized_to_int8_on_request_and_the_tied_embedding_stays(captured):
    program, shape, context = captured
    build = BuildConfig(quantization="int4_wo", group_size=32, quantize_lm_head=True)
    quantized = run_passes(program, dataclasses.replace(context, build=build)).program
    assert not nodes_calling(quantized.graph, LINEAR)
    state = quantized.state_dict
    assert state["model.lm_head.qweight"].dtype == torch.int8
    assert "model.lm_head.weight" in state  # the embedding reads it
    assert "model.lm_head.weight" in quantized_layers(quantized)


def test_a_group_size_that_does_not_divide_k_names_the_layer(captured):
    program, _, context = captured
    build = BuildConfig(quantization="int4_wo", group_size=128)  # hidden size 64
    with pytest.raises(KilnError, match=r"fused_q_proj_k_proj_v_proj.weight to int4 in groups of 128.*in_features 64"):
        run_passes(program, dataclasses.replace(context, build=build))


def test_a_checkpoint_s_quantized_weights_are_put_in_place_by_name(captured):
    """q/k/v come quantized (keys without the program's wrapper prefix); the rest stays dense."""
    program, shape, context = captured
    state = program.state_dict
    names = [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
    weights = {n: quantize_int8(state["model." + n]) for n in names}
    linears = QuantizedLinears("gptq", 8, 64, weights)
    run = run_passes(program, dataclasses.replace(context, quantized=linears))
    assert run.changes["quantize_linears"] == 1
    packed = run.program.state_dict["model.model.layers.0.self_attn.fused_q_proj_k_proj_v_proj.qweight"]
    assert torch.equal(packed, torch.cat([weights[n].values for n in names]))
    assert quantized_layers(run.program) == ["model." + n for n in names]


def test_quantized_weights_in_different_column_orders_are_not_fused(captured):
    program, shape, context = captured
    state = program.state_dict
    weights = {}
    for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
        base = quantize_int8(state[f"model.model.layers.0.self_attn.{p}.weight"])
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(i))
        weights[f"model.layers.0.self_attn.{p}.weight"] = dataclasses.replace(base, perm=perm)
    run = run_passes(program, dataclasses.replace(context, quantized=QuantizedLinears("gptq", 8, 64, weights)))
    assert run.changes["fuse_projections"] == 2 * shape.num_layers - 1  # layer 0's q/k/v stay apart
    assert run.changes["quantize_linears"] == 3


class _KilnOps(torch.nn.Module):
    """Each kiln linear op once, as the fused-linear passes leave them on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, shape in (("a", (64, 64)), ("b", (64, 32)), ("c", (64, 64)), ("d", (64, 64)), ("e", (128, 64))):
            self.register_parameter(name, torch.nn.Parameter(torch.randn(*shape, generator=g), requires_grad=False))
        self.norm = torch.nn.Parameter(torch.rand(64, generator=g) + 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.kiln
        h = ops.linear(x, self.a, None, True, x)
        h = ops.silu_mul_linear(h, self.b, None, True, None)
        h = ops.rms_norm_linear(h, self.norm, 1e-5, self.c)
        h = ops.linear_rope(h, self.d, None, True, self.norm, 1e-5, cos, sin, 32)
        return ops.linear_silu_mul(h, self.e, None, True, None, 0.0)


def test_the_five_kiln_linear_ops_take_the_packed_weights():
    module = _KilnOps()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(3, 64, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g))
    program = torch.export.export(module, inputs)
    context = PassContext(architecture="ops", num_layers=0, build=BuildConfig(quantization="int4_wo", group_size=32))
    result = QUANTIZATION_PASSES[0](program, context)
    assert result.sites == 5
    assert all(k.endswith((".qweight", ".scales", ".zeros")) or k == "norm" for k in result.program.state_dict)
    for name in "abcde":
        weight = getattr(module, name)
        q: QuantizedWeight = quantize(weight, 4, 32)
        weight.data = q.dequantize(torch.float32)
    with torch.no_grad():
        assert torch.equal(result.program.module()(*inputs), module(*inputs))
    assert QUANTIZATION_PASSES[0](result.program, context).program is result.program  # nothing left to pack


def test_an_attention_prefetch_of_a_quantized_weight_reads_its_packed_weight(captured):
    from kiln.compiler.passes.prefetch_output_weights import prefetch_output_weights
    from kiln.compiler.passes.small_batch_linear import rewrite_linears

    program, shape, context = captured
    program = run_passes(program, context).program
    forced = prefetch_output_weights(rewrite_linears(program, lambda node: True).program, context).program
    build = BuildConfig(quantization="int8_wo")
    quantized = quantize_linears(forced, dataclasses.replace(context, build=build)).program
    calls = nodes_calling(quantized.graph, torch.ops.kiln.paged_attention.default)
    for layer, call in enumerate(calls):
        assert call.args[-2].name == f"p_model_model_layers_{layer}_self_attn_o_proj_qweight"
        assert call.args[-1].name == f"p_model_model_layers_{layer}_mlp_fused_gate_proj_up_proj_qweight"
    assert not [name for name in quantized.state_dict if name.endswith("o_proj.weight")]
    assert torch.equal(
        _run(quantized, shape),
        _run(quantize_linears(program, dataclasses.replace(context, build=build)).program, shape),
    )


def test_scales_keep_their_precision_where_it_costs_little():
    w = torch.randn(8, 64)
    bf16 = torch.bfloat16
    assert scale_dtype(quantize_int8(w), bf16) == torch.float32  # one per row
    assert scale_dtype(quantize(w, 4, 32), bf16) == bf16  # per group: the model's dtype
    assert scale_dtype(quantize(w, 4, 32), torch.float32) == torch.float32
    checkpoint = quantize(w, 4, 32)
    checkpoint = dataclasses.replace(checkpoint, scales=checkpoint.scales.half(), zeros=checkpoint.zeros.half())
    assert scale_dtype(checkpoint, bf16) == torch.float16  # a checkpoint's, as stored
