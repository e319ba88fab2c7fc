"""What passes may read besides the graph."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class PassContext:
    architecture: str
    num_layers: int
    input_names: tuple[str, ...] = ()  # the program's user inputs; empty: the text engine's INPUT_NAMES


def copy_graph(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A copy of the program's graph module to rewrite (the weights are not part of it)."""
    return copy.deepcopy(program.graph_module)


def user_input_nodes(
    program: torch.export.ExportedProgram, graph: torch.fx.Graph, names: tuple[str, ...] = ()
) -> dict[str, torch.fx.Node]:
    """The graph's user-input placeholders, keyed by the wrapper's argument names."""
    from kiln.compiler.capture import INPUT_NAMES

    names = names or INPUT_NAMES
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != len(names):
        raise RuntimeError(f"expected {len(names)} user inputs, the program has {len(user_inputs)}")
    return {name: placeholders[spec] for name, spec in zip(names, user_inputs)}


def nodes_calling(graph: torch.fx.Graph, target: object) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]
