"""The bytes of weights one decode step of a program (or a transformers model) reads.

A quantized program's linears hold packed weights, scales, zero points (and a column order) as
parameters and dequantize them per call, so counting the parameters counts the bytes a step
reads: no dense copy of a quantized weight is ever part of the program.
"""

from __future__ import annotations

import torch


def decode_weight_bytes(program: torch.export.ExportedProgram) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (shared storage once),
    except tables that only embedding lookups read (they fetch a row per token, not the table)."""
    embedding_only: set[str] = set()
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    to_state = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
    for name, node in placeholders.items():
        users = list(node.users)
        if name in to_state and users and all("embedding" in str(u.target) for u in users):
            embedding_only.add(to_state[name])
    seen: dict[int, int] = {}
    for key, tensor in program.state_dict.items():
        if key in embedding_only:
            continue
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def module_weight_bytes(model: torch.nn.Module) -> int:
    """The same count for a transformers model: its parameters and buffers once, except an input
    embedding table that no output layer shares."""
    table = _weight(model, "get_input_embeddings")
    output = _weight(model, "get_output_embeddings")
    skip = None
    if table is not None and (output is None or _storage(output) != _storage(table)):
        skip = _storage(table)
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if _storage(tensor) != skip:
            seen[_storage(tensor)] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _weight(model: torch.nn.Module, getter: str) -> torch.Tensor | None:
    layer = getattr(model, getter)() if callable(getattr(model, getter, None)) else None
    weight = getattr(layer, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _storage(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())
