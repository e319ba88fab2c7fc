"""What passes may read besides the graph."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.export.graph_signature import ExportGraphSignature, OutputSpec, TensorArgument

from kiln.compiler.capture import INPUT_NAMES
from kiln.config import BuildConfig
from kiln.models.quantized_checkpoint import QuantizedLinears

M = TypeVar("M")


@dataclass(frozen=True, kw_only=True)
class PassContext:
    architecture: str
    num_layers: int
    input_names: tuple[str, ...] = ()  # the program's user inputs; empty: the text engine's INPUT_NAMES
    build: BuildConfig = BuildConfig()
    quantized: QuantizedLinears | None = None  # a checkpoint's (or AWQ's) quantized linears, by dense name
    kv_scales: tuple[tuple[float, float], ...] | None = None  # a narrow KV cache's (k, v) scales per layer


@dataclass(frozen=True)
class PassResult:
    """A pass's rewritten program and the number of sites it rewrote (0: `program` is its input)."""

    program: torch.export.ExportedProgram
    sites: int = 0

    def then(self, other: "PassResult") -> "PassResult":
        """This rewrite followed by `other` (made on `self.program`): other's program, both counts."""
        return PassResult(other.program, self.sites + other.sites)


def copy_graph(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A copy of the program's graph module to rewrite (the weights are not part of it)."""
    return copy.deepcopy(program.graph_module)


def user_input_nodes(
    program: torch.export.ExportedProgram, graph: torch.fx.Graph, names: tuple[str, ...] = ()
) -> dict[str, torch.fx.Node]:
    """The graph's user-input placeholders, keyed by the wrapper's argument names."""
    names = names or INPUT_NAMES
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != len(names):
        raise RuntimeError(f"expected {len(names)} user inputs, the program has {len(user_inputs)}")
    return {name: placeholders[spec] for name, spec in zip(names, user_inputs)}


def nodes_calling(graph: torch.fx.Graph, target: object) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


def output_specs(graph: torch.fx.Graph, signature: ExportGraphSignature) -> list[OutputSpec]:
    """The signature's output specs renamed after the graph's output node (a rewritten node may be an output)."""
    results = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    assert isinstance(results, (list, tuple)) and len(results) == len(signature.output_specs)
    specs = []
    for spec, node in zip(signature.output_specs, results):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, torch.fx.Node):
            spec = OutputSpec(kind=spec.kind, arg=TensorArgument(name=node.name), target=spec.target)
        specs.append(spec)
    return specs


def with_graph(program: torch.export.ExportedProgram, module: torch.fx.GraphModule) -> torch.export.ExportedProgram:
    """The program with its graph replaced by `module`'s (dead nodes removed, linted, recompiled);
    same inputs and weights."""
    graph = module.graph
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    signature = ExportGraphSignature(
        input_specs=list(program.graph_signature.input_specs),
        output_specs=output_specs(graph, program.graph_signature),
    )
    return program._update(module, signature)


def rewrite_matches(
    program: torch.export.ExportedProgram,
    target: object,
    match: Callable[[torch.fx.Node], M | None],
    rewrite: Callable[[torch.fx.Graph, torch.fx.Node, M], None],
) -> PassResult:
    """The common shape of a rewriting pass: on a copy of the program, `rewrite(graph, node, found)`
    for each node calling `target` for which `match(node)` found something in the original graph
    (matched again on the copy, as earlier rewrites left it); the program itself when none matched."""
    targets = {n.name for n in nodes_calling(program.graph_module.graph, target) if match(n) is not None}
    if not targets:
        return PassResult(program)
    module = copy_graph(program)
    for node in nodes_calling(module.graph, target):
        if node.name in targets:
            found = match(node)
            assert found is not None, f"{node.name} no longer matches after the rewrites before it"
            rewrite(module.graph, node, found)
    return PassResult(with_graph(program, module), len(targets))


def projection_args(node: torch.fx.Node) -> tuple[object, ...]:
    """(x, weight, bias, constant_weight, norm_weight, eps) of a kiln.linear (no norm: None, 0.0) or a
    kiln.rms_norm_linear call, defaults filled in: the leading arguments of the ops with an epilogue."""
    if node.target == torch.ops.kiln.rms_norm_linear.default:
        x, norm_weight, eps, weight, bias, constant = (list(node.args) + [None, False][len(node.args) - 4 :])[:6]
        return (x, weight, bias, constant, norm_weight, eps)
    x, weight, bias, constant = (list(node.args) + [None, False][len(node.args) - 2 :])[:4]
    return (x, weight, bias, constant, None, 0.0)


def refresh_values(nodes: list[torch.fx.Node]) -> None:
    """Recompute the fake `val` of call nodes (in order) from their inputs' vals, after a rewrite
    changed their shapes."""
    for node in nodes:
        values = [a.meta.get("val") for a in node.all_input_nodes]
        fake = next((v for v in values if isinstance(v, torch._subclasses.fake_tensor.FakeTensor)), None)
        if fake is None:
            continue

        def value_of(arg: object) -> object:
            return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg

        args = torch.fx.node.map_aggregate(node.args, value_of)  # type: ignore[arg-type]
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value_of)  # type: ignore[arg-type]
        with fake.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]


def replace_with_call(
    graph: torch.fx.Graph, node: torch.fx.Node, target: object, args: tuple[object, ...]
) -> torch.fx.Node:
    """Put a call of `target` on `args` where `node` is: same metadata, same users; `node` is erased."""
    with graph.inserting_before(node):
        call = graph.call_function(target, args)  # type: ignore[arg-type]
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return call


def real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's users other than torch.export's `_assert_tensor_metadata` checks."""
    return [u for u in node.users if u.target != torch.ops.aten._assert_tensor_metadata.default]


def drop_metadata_checks(graph: torch.fx.Graph, nodes: list[torch.fx.Node]) -> None:
    """Erase the `_assert_tensor_metadata` checks on `nodes` (they have side effects, so DCE keeps them)."""
    for node in nodes:
        for user in list(node.users):
            if user.target == torch.ops.aten._assert_tensor_metadata.default:
                graph.erase_node(user)
