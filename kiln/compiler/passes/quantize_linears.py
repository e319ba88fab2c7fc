"""Replace each linear's dense weight by its packed quantized form: the build's last pass.

    aten.linear(x, W, b)            -> kiln.linear(x, qweight, b, True, None, scales, zeros, perm, g[, act])
    kiln.<linear op>(..., W, ...)   -> kiln.<linear op>(..., qweight, ..., scales, zeros, perm, g[, act])

(act: a W8A8 weight's activations mode and static input_scale, `kiln.kernels.quantized_weight`.)

The quantized weight comes from `context.quantized` (a checkpoint's, or AWQ's) by the parameter's
name (a fused weight: by the names it was fused from), else from round-to-nearest when the build
asks for it (`BuildConfig.quantization`). The embedding keeps its dense table; lm_head (a weight
named `lm_head` or tied to the embedding) is quantized only with `quantize_lm_head`, to int8 per
channel. The packed tensors become parameters (`<layer>.qweight`, `.scales`, `.zeros`, `.perm`)
and a dense weight no longer read is dropped. The ops dequantize per call, so Inductor never sees
a dense copy of the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

import kiln.kernels  # noqa: F401  (registers the kiln ops)
from kiln.compiler.passes.context import (
    PassContext,
    PassResult,
    copy_graph,
    drop_metadata_checks,
    output_specs,
    real_users,
)
from kiln.compiler.quantize.lookup import FUSED_FROM, concat, find
from kiln.compiler.quantize.methods import RTN_BITS  # int4_awq: a layer AWQ left out gets RTN
from kiln.compiler.quantize.rtn import quantize
from kiln.errors import KilnError
from kiln.kernels.quantized_weight import PackedWeight, QuantizedWeight, pack

KILN = torch.ops.kiln
LINEAR = torch.ops.aten.linear.default
LAYERS = "quantized_layers"  # qweight placeholder meta: the dense names this weight stands for
PACKED_FIELDS = ("qweight", "scales", "zeros", "perm", "input_scale")


@dataclass(frozen=True)
class _Op:
    weight: int  # position of the weight argument
    leading: int  # arguments before scales, zeros, perm, group_size


OPS = {
    KILN.linear.default: _Op(1, 5),
    KILN.silu_mul_linear.default: _Op(1, 5),
    KILN.rms_norm_linear.default: _Op(3, 6),
    KILN.linear_rope.default: _Op(1, 9),
    KILN.linear_silu_mul.default: _Op(1, 6),
}


def quantize_linears(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """Linear weights -> packed int8/int4 parameters read by the kiln linear ops (weight-only quantization)."""
    module = copy_graph(program)
    graph = module.graph
    params = program.graph_signature.inputs_to_parameters
    state = dict(program.state_dict)
    specs = list(program.graph_signature.input_specs)
    packed: dict[str, tuple[torch.fx.Node, ...] | None] = {}  # by dense placeholder name
    sites = 0
    for node in list(graph.nodes):
        op = OPS.get(node.target) if node.op == "call_function" else None
        if (node.target != LINEAR and op is None) or (op is not None and len(node.args) > op.leading):
            continue  # not a linear, or one that reads a quantized weight already
        weight = node.args[op.weight if op else 1] if len(node.args) > 1 else None
        if not isinstance(weight, torch.fx.Node) or weight.name not in params or node.kwargs:
            continue
        if weight.name not in packed:
            quantized = _quantized_weight(weight, params[weight.name], state, context)
            packed[weight.name] = None if quantized is None else _place(graph, specs, state, weight, params, quantized)
        nodes = packed[weight.name]
        if nodes is None:
            continue
        qweight, scales, zeros, perm, input_scale = nodes
        group_size = int(scales.meta["group_size"])
        activations = str(scales.meta.get("activations", "none"))
        act = () if activations == "none" else (activations, input_scale)
        if op is None:
            bias = node.args[2] if len(node.args) > 2 else None
            args: tuple[object, ...] = (node.args[0], qweight, bias, True, None)
            target = KILN.linear.default
        else:
            args = _filled(node, op)
            args = (*args[: op.weight], qweight, *args[op.weight + 1 :])
            target = node.target
        with graph.inserting_before(node):
            call = graph.call_function(target, (*args, scales, zeros, perm, group_size, *act))  # type: ignore[arg-type]
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        sites += 1
    if not sites:
        return PassResult(program)
    specs = _drop_unread(graph, specs, state, params, [n for n, p in packed.items() if p is not None])
    graph.lint()
    module.recompile()
    signature = ExportGraphSignature(input_specs=specs, output_specs=output_specs(graph, program.graph_signature))
    return PassResult(program._update(module, signature, state_dict=state), sites)


def quantized_layers(program: torch.export.ExportedProgram) -> list[str]:
    """The dense weight names whose linears read a quantized weight, in graph order."""
    return [name for n in program.graph.nodes if n.op == "placeholder" for name in n.meta.get(LAYERS, ())]


def _is_lm_head(weight: torch.fx.Node, target: str) -> bool:
    return "lm_head" in target.split(".") or any("embedding" in str(u.target) for u in weight.users)


def _quantized_weight(
    weight: torch.fx.Node, target: str, state: dict[str, torch.Tensor], context: PassContext
) -> tuple[QuantizedWeight, tuple[str, ...]] | None:
    """The weight's quantized form and the dense names it stands for; None: it stays dense."""
    dense = state[target]
    build = context.build
    lm_head = _is_lm_head(weight, target)
    if dense.dim() != 2 or (lm_head and not build.quantize_lm_head):
        return None
    names = tuple(weight.meta.get(FUSED_FROM, (target,)))
    found = [find(context.quantized, name) for name in names]
    if all(w is not None for w in found):
        quantized = concat([w for w in found if w is not None], names)
    elif any(w is not None for w in found):
        raise KilnError(f"{target} fuses quantized and dense weights ({', '.join(names)}); kiln cannot pack them")
    elif lm_head or build.quantization in RTN_BITS:
        bits = 8 if lm_head else RTN_BITS[build.quantization]
        _check_shape(target, dense.shape, bits, build.group_size)
        quantized = quantize(dense, bits, build.group_size)
    else:
        return None
    if quantized.shape != tuple(dense.shape):
        raise KilnError(f"{target}: the quantized weight is {list(quantized.shape)}, the model's {list(dense.shape)}")
    return quantized, names


def _check_shape(target: str, shape: torch.Size, bits: int, group_size: int) -> None:
    k = int(shape[1])
    if bits == 4 and (k % group_size or k % 2):
        raise KilnError(
            f"cannot quantize {target} to int4 in groups of {group_size}: its in_features {k} is not a multiple "
            f"of {group_size}; build with a --group-size that divides it (32, 64 or 128) or without --quantization"
        )


def _place(
    graph: torch.fx.Graph,
    specs: list[InputSpec],
    state: dict[str, torch.Tensor],
    dense: torch.fx.Node,
    params: dict[str, str],
    found: tuple[QuantizedWeight, tuple[str, ...]],
) -> tuple[torch.fx.Node, ...]:
    """Placeholders of the packed tensors (qweight, scales, zeros, perm; None where absent) before `dense`."""
    quantized, names = found
    dtype = scale_dtype(quantized, state[params[dense.name]].dtype)
    packed = pack(quantized)
    values = PackedWeight(
        packed.qweight,
        packed.scales.to(dtype),
        None if packed.zeros is None else packed.zeros.to(dtype),
        packed.perm,
    )
    extra = {"input_scale": quantized.input_scale}
    base = params[dense.name].removesuffix(".weight")
    fake_mode = dense.meta["val"].fake_mode
    at = next(i for i, s in enumerate(specs) if s.arg.name == dense.name)  # type: ignore[union-attr]
    nodes: list[torch.fx.Node | None] = []
    for field_name in PACKED_FIELDS:
        value = extra[field_name] if field_name in extra else getattr(values, field_name)
        if value is None:
            nodes.append(None)
            continue
        target = f"{base}.{field_name}"
        state[target] = torch.nn.Parameter(value.contiguous(), requires_grad=False)
        with graph.inserting_before(dense):
            node = graph.placeholder("p_" + target.replace(".", "_"))
        node.meta = {k: v for k, v in dense.meta.items() if k not in ("val", FUSED_FROM)}
        node.meta["val"] = fake_mode.from_tensor(state[target], static_shapes=True)
        specs.insert(at, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target))
        at += 1
        nodes.append(node)
    qweight, scales = nodes[0], nodes[1]
    assert qweight is not None and scales is not None
    qweight.meta[LAYERS] = names
    qweight.meta["dense"] = dense.name
    scales.meta["group_size"] = quantized.group_size
    scales.meta["activations"] = quantized.activations
    return tuple(nodes)  # type: ignore[arg-type]


def scale_dtype(quantized: QuantizedWeight, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a program stores the scales (and zero points) in: a checkpoint's 16-bit scales as they
    are; float32 ones (round-to-nearest, AWQ) in float32 for one scale per row (a few bytes a row) and
    in the model dtype per group (halving their bytes in a 16-bit model)."""
    if quantized.scales.dtype != torch.float32:
        return quantized.scales.dtype
    return torch.float32 if quantized.group_size == quantized.shape[1] else model_dtype


def _filled(node: torch.fx.Node, op: _Op) -> tuple[object, ...]:
    """The node's leading arguments with the schema's defaults where it omits them."""
    schema = node.target._schema  # type: ignore[union-attr]
    args = list(node.args[: op.leading])
    for argument in schema.arguments[len(args) : op.leading]:
        args.append(argument.default_value)
    return tuple(args)


def _drop_unread(
    graph: torch.fx.Graph,
    specs: list[InputSpec],
    state: dict[str, torch.Tensor],
    params: dict[str, str],
    replaced: list[str],
) -> list[InputSpec]:
    """Remove the dense weights nothing reads now; a paged-attention prefetch of one reads its qweight."""
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    qweights = {n.meta.get("dense"): n for n in placeholders.values() if LAYERS in n.meta}
    for name in replaced:
        dense = placeholders[name]
        prefetch = qweights.get(name)
        for user in list(dense.users):
            if user.target == KILN.paged_attention.default and prefetch is not None:
                user.replace_input_with(dense, prefetch)
        if real_users(dense):
            continue  # a tied embedding still reads it
        drop_metadata_checks(graph, [dense])
        graph.erase_node(dense)
        specs = [s for s in specs if s.arg.name != name]  # type: ignore[union-attr]
        del state[params[name]]
    return specs


__all__ = ["OPS", "quantize_linears", "quantized_layers", "scale_dtype"]
