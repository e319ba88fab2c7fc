"""Fuse the linears that read one input (q/k/v, gate/up) into one linear over concatenated weights.

Each old linear's users read a slice of the fused output's last dim: a strided view, which
pointwise ops, transposes and views that only split the last dim take as it is. A view that
merges dims (fewer dims than its input) gets a contiguous copy of the slice instead.

The pass re-runs no op on the program's symbolic sizes: the new nodes' fake values are built
from static weights, an empty tensor and a slice of a static dim, so the program's shape
environment gains no guard (re-propagating the whole graph specialised the token count on
torch 2.11).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

from kiln.compiler.passes.context import PassContext, PassResult, copy_graph, nodes_calling, output_specs
from kiln.compiler.quantize.lookup import FUSED_FROM, fusable
from kiln.models.quantized_checkpoint import QuantizedLinears

LINEAR = torch.ops.aten.linear.default
SLICE = torch.ops.aten.slice.Tensor
CLONE = torch.ops.aten.clone.default
VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


@dataclass
class _Group:
    """Linears of one input whose weights (and biases, all or none) are parameters used nowhere else."""

    linears: list[torch.fx.Node]
    weights: list[torch.fx.Node]
    biases: list[torch.fx.Node]


def fuse_projections(program: torch.export.ExportedProgram, context: PassContext) -> PassResult:
    """linear(x, Wq), linear(x, Wk), ... -> slices of linear(x, cat(Wq, Wk, ...)): one weight read, one launch."""
    groups = _groups(program, program.graph_module.graph, context.quantized)
    if not groups:
        return PassResult(program)
    try:
        return PassResult(_fuse(program, groups), len(groups))
    except Exception as exc:  # an optimisation: never the reason a build fails
        warnings.warn(
            f"fuse_projections left {context.architecture} unfused: {type(exc).__name__}: {exc}", stacklevel=2
        )
        return PassResult(program)


def _groups(
    program: torch.export.ExportedProgram, graph: torch.fx.Graph, quantized: QuantizedLinears | None = None
) -> list[list[str]]:
    """Names of the linear nodes to fuse, one list per group, in graph order; linears whose quantized
    weights (`quantized`) cannot be stacked into one stay apart."""
    params = program.graph_signature.inputs_to_parameters
    shared = _aliased_targets(program)
    order = {n: i for i, n in enumerate(graph.nodes)}

    def own_parameter(node: object, dims: int) -> torch.Tensor | None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder" or node.name not in params:
            return None
        if len(node.users) != 1 or params[node.name] in shared:
            return None  # used twice, or tied to another entry of the state dict
        value = program.state_dict[params[node.name]]
        return value if value.dim() == dims else None

    buckets: dict[tuple[object, ...], list[torch.fx.Node]] = defaultdict(list)
    for node in nodes_calling(graph, LINEAR):
        if node.kwargs or len(node.args) not in (2, 3):
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) == 3 else None
        weight = own_parameter(w, 2)
        if weight is None or (b is not None and own_parameter(b, 1) is None):
            continue
        bias = None if b is None else program.state_dict[params[b.name]]  # type: ignore[union-attr]
        if bias is not None and (bias.dtype != weight.dtype or bias.device != weight.device):
            continue
        buckets[(x, b is not None, weight.dtype, weight.device, weight.shape[1])].append(node)
    groups = [
        sorted(nodes, key=order.__getitem__)
        for nodes in buckets.values()
        if len(nodes) > 1 and fusable(quantized, [params[n.args[1].name] for n in nodes])  # type: ignore[union-attr]
    ]
    return [[n.name for n in nodes] for nodes in sorted(groups, key=lambda nodes: order[nodes[0]])]


def _aliased_targets(program: torch.export.ExportedProgram) -> set[str]:
    """State-dict and constant entries whose storage another entry shares (tied weights)."""
    by_storage: dict[tuple[torch.device, int], list[str]] = defaultdict(list)
    tensors = {**program.constants, **program.state_dict}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            by_storage[(value.device, value.untyped_storage().data_ptr())].append(name)
    return {name for names in by_storage.values() if len(names) > 1 for name in names}


def _fuse(program: torch.export.ExportedProgram, names: list[list[str]]) -> torch.export.ExportedProgram:
    module = copy_graph(program)
    graph = module.graph
    nodes = {n.name: n for n in graph.nodes}
    params = program.graph_signature.inputs_to_parameters
    state = dict(program.state_dict)
    specs = list(program.graph_signature.input_specs)
    fake_mode = _fake_mode(graph)
    for group_names in names:
        linears = [nodes[name] for name in group_names]
        group = _Group(linears, [n.args[1] for n in linears], [n.args[2] for n in linears if len(n.args) == 3])  # type: ignore[misc]
        targets = [params[w.name] for w in group.weights]
        weight = _new_parameter(graph, specs, state, group.weights, params, _fused_target(targets, state), fake_mode)
        bias = None
        if group.biases:
            bias_target = _fused_target([params[b.name] for b in group.biases], state)
            bias = _new_parameter(graph, specs, state, group.biases, params, bias_target, fake_mode)
        _replace(graph, group, weight, bias, [state.pop(t).shape[0] for t in targets], fake_mode)
        for b in group.biases:
            del state[params[b.name]]
        for placeholder in group.weights + group.biases:
            specs = [s for s in specs if s.arg.name != placeholder.name]  # type: ignore[union-attr]
            graph.erase_node(placeholder)
    graph.lint()
    module.recompile()
    signature = ExportGraphSignature(input_specs=specs, output_specs=output_specs(graph, program.graph_signature))
    return program._update(module, signature, state_dict=state)


def _fake_mode(graph: torch.fx.Graph) -> torch._subclasses.fake_tensor.FakeTensorMode:
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    if mode is None:
        raise RuntimeError("the program's placeholders carry no fake tensors")
    return mode


def _fused_target(targets: list[str], state: dict[str, torch.Tensor]) -> str:
    """`a.b.q_proj.weight`, `a.b.k_proj.weight` -> `a.b.fused_q_proj_k_proj.weight` (unused in the state dict)."""
    paths = [t.split(".") for t in targets]
    prefix: list[str] = []
    for parts in zip(*(p[:-2] for p in paths)):
        if len(set(parts)) > 1:
            break
        prefix.append(parts[0])
    leaves = ["_".join(p[len(prefix) : -1]) for p in paths]
    base = ".".join([*prefix, "fused_" + "_".join(leaves)])
    target, i = f"{base}.{paths[0][-1]}", 1
    while target in state:
        target, i = f"{base}_{i}.{paths[0][-1]}", i + 1
    return target


def _new_parameter(
    graph: torch.fx.Graph,
    specs: list[InputSpec],
    state: dict[str, torch.Tensor],
    olds: list[torch.fx.Node],
    params: dict[str, str],
    target: str,
    fake_mode: torch._subclasses.fake_tensor.FakeTensorMode,
) -> torch.fx.Node:
    """Placeholder of cat(old parameters), placed where the first old one is, in the graph and the signature."""
    first = olds[0]
    with torch.no_grad():
        value = torch.cat([state[params[n.name]] for n in olds], dim=0)
    state[target] = torch.nn.Parameter(value, requires_grad=False)
    with graph.inserting_before(first):
        node = graph.placeholder("p_" + target.replace(".", "_"))
    node.meta = {k: v for k, v in first.meta.items() if k != "val"}
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    node.meta[FUSED_FROM] = tuple(params[n.name] for n in olds)  # the quantization pass looks its parts up
    at = next(i for i, s in enumerate(specs) if s.arg.name == first.name)  # type: ignore[union-attr]
    specs.insert(at, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target))
    return node


def _replace(
    graph: torch.fx.Graph,
    group: _Group,
    weight: torch.fx.Node,
    bias: torch.fx.Node | None,
    widths: list[int],
    fake_mode: torch._subclasses.fake_tensor.FakeTensorMode,
) -> None:
    """One linear before the group's first, a slice of its last dim for each old linear's users."""
    first = group.linears[0]
    x = first.args[0]
    args = (x, weight) if bias is None else (x, weight, bias)
    first_val = first.meta["val"]
    last_dim = first_val.dim() - 1
    with fake_mode:
        fused_val = first_val.new_empty((*first_val.shape[:-1], sum(widths)))
    with graph.inserting_before(first):
        fused = graph.call_function(LINEAR, args)
        fused.meta = {k: v for k, v in first.meta.items() if k != "val"}
        fused.meta["val"] = fused_val
        start = 0
        for old, width in zip(group.linears, widths):
            part = graph.call_function(SLICE, (fused, last_dim, start, start + width))
            part.meta = {k: v for k, v in old.meta.items() if k != "val"}
            with fake_mode:
                part.meta["val"] = SLICE(fused_val, last_dim, start, start + width)
            if _merges_dims(old):
                copy = graph.call_function(CLONE, (part,), {"memory_format": torch.contiguous_format})
                copy.meta = dict(old.meta)
                part = copy
            old.replace_all_uses_with(part)
            start += width
    for old in group.linears:
        graph.erase_node(old)


def _merges_dims(linear: torch.fx.Node) -> bool:
    """Whether a user views the output with fewer dims, which a slice of the last dim may not allow."""
    rank = linear.meta["val"].dim()
    return any(
        user.target in VIEWS and isinstance(user.args[1], (list, tuple)) and len(user.args[1]) < rank
        for user in linear.users
    )


__all__ = ["fuse_projections"]
