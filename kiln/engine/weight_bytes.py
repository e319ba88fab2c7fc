"""The bytes of weights one decode step of a program reads."""

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
