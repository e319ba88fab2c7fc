"""Loading an engine program: the exported graph with its weights, run op by op or as its compiled artifact.

`load_program` is the one loader of the engine's programs (the LLM program at the engine's root, the
vision program in `vision/`): a damaged or missing file is an `EngineMismatchError` that names the
file and says to rebuild.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.engine.manifest import COMPILED, PROGRAM, WEIGHTS
from kiln.engine.program_files import attach_weights, load_graph
from kiln.engine.weight_bytes import decode_weight_bytes
from kiln.errors import EngineMismatchError, KilnError


class Program(Protocol):
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...


def _lifted_state(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """Parameters, buffers and constants in the order the lifted graph takes them."""
    values = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        target = spec.target
        values.append(program.state_dict[target] if target in program.state_dict else program.constants[target])
    return values


def _user_output_index(program: torch.export.ExportedProgram) -> int:
    kinds = [spec.kind for spec in program.graph_signature.output_specs]
    return kinds.index(torch.export.graph_signature.OutputKind.USER_OUTPUT)


class EagerProgram:
    """The exported program run op by op (no Inductor)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        self.module = program.module()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.module(*inputs)


class CompiledProgram:
    """A loaded CompiledArtifact fed with the program's weights."""

    def __init__(self, artifact: Any, program: torch.export.ExportedProgram) -> None:
        self.artifact = artifact
        self.state = _lifted_state(program)
        self.output = _user_output_index(program)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.artifact(*self.state, *inputs)[self.output]


def load_compiled(program: torch.export.ExportedProgram, path: Path) -> CompiledProgram:
    """The artifact `kiln.compiler.inductor.compile_program` saved at `path`, fed with `program`'s weights."""
    from torch._inductor import CompiledArtifact

    if not path.is_file():
        raise KilnError(f"{path} is missing: the engine's compiled program is gone; rebuild the engine")
    return CompiledProgram(CompiledArtifact.load(path=str(path), format="binary"), program)


@dataclass(frozen=True)
class LoadedProgram:
    """A program ready to call, and the bytes of weights one decode step reads (see `decode_weight_bytes`)."""

    program: Program
    weight_bytes: int


def load_program(directory: Path, device: torch.device, *, compiled: bool) -> LoadedProgram:
    """The program stored in `directory` (program.pt2, its weights, and compiled.bin when `compiled`),
    with its weights on `device`; a file that cannot be loaded is an EngineMismatchError naming it."""
    path = directory / PROGRAM
    try:
        if not zipfile.is_zipfile(path):  # before torch, which logs a traceback of its own
            raise ValueError("not a torch.export archive")
        exported = load_graph(path)
        path = directory / WEIGHTS
        attach_weights(exported, directory, device)
        weight_bytes = decode_weight_bytes(exported)
        if not compiled:
            return LoadedProgram(EagerProgram(exported), weight_bytes)
        path = directory / COMPILED
        return LoadedProgram(load_compiled(exported, path), weight_bytes)
    except KilnError:
        raise
    except Exception as exc:
        raise EngineMismatchError(
            f"{path} cannot be loaded ({type(exc).__name__}: {str(exc).strip()[:200]}); "
            "the engine is damaged or incomplete: rebuild it with `kiln build`"
        ) from exc
