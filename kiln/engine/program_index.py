"""What loading a compiled program needs from its graph, recorded by the build in `program_index.json`.

A compiled program is the Inductor artifact called with the lifted weights and then the user inputs;
from the ExportedProgram the loader needs only the weights' order, shapes and dtypes, which output
is the user's, and the bytes one decode step reads. `torch.export.load` spends most of a second
parsing symbolic shapes to give those, so the build writes them here. Engines without the file
(built before it existed) load through `torch.export.load` as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.engine.manifest import PROGRAM_INDEX
from kiln.engine.weight_bytes import decode_weight_bytes

_VERSION = 1


@dataclass(frozen=True)
class LiftedInput:
    """One weight the compiled program takes before the user inputs."""

    name: str
    dtype: str  # "float32"
    shape: tuple[int, ...]

    def check(self, value: torch.Tensor) -> None:
        """A ValueError when `value` is not the tensor the program was compiled for."""
        if str(value.dtype).removeprefix("torch.") != self.dtype or tuple(value.shape) != self.shape:
            got = f"{value.dtype} {tuple(value.shape)}"
            raise ValueError(f"{self.name} is {got}, the program wants {self.dtype} {self.shape}")


@dataclass(frozen=True)
class ProgramIndex:
    lifted: tuple[LiftedInput, ...]  # in the order the compiled program takes them
    output: int  # index of the user's output among the program's outputs
    weight_bytes: int  # see decode_weight_bytes
    vec_isa: str | None  # the CPU vector ISA Inductor picked at build (None off the CPU)

    def to_json(self) -> str:
        lifted = [{"name": x.name, "dtype": x.dtype, "shape": list(x.shape)} for x in self.lifted]
        data = {"version": _VERSION, "lifted": lifted, "output": self.output, "weight_bytes": self.weight_bytes}
        return json.dumps({**data, "vec_isa": self.vec_isa})

    @classmethod
    def from_json(cls, text: str) -> ProgramIndex:
        data = json.loads(text)
        if data["version"] != _VERSION:
            raise ValueError(f"{PROGRAM_INDEX} version {data['version']}, this kiln reads {_VERSION}")
        lifted = tuple(LiftedInput(x["name"], x["dtype"], tuple(x["shape"])) for x in data["lifted"])
        return cls(lifted, data["output"], data["weight_bytes"], data["vec_isa"])


def cpu_vec_isa() -> str:
    """The vector ISA Inductor compiles CPU kernels for in this process (probed: may start a compiler)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


def index_of(program: torch.export.ExportedProgram) -> ProgramIndex | None:
    """The index of `program` (with its weights), or None when a lifted input is not a tensor."""
    kinds = torch.export.graph_signature
    lifted = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == kinds.InputKind.USER_INPUT:
            continue
        target = spec.target
        value = program.state_dict[target] if target in program.state_dict else program.constants.get(target)
        if target is None or not isinstance(value, torch.Tensor):
            return None
        lifted.append(LiftedInput(target, str(value.dtype).removeprefix("torch."), tuple(value.shape)))
    outputs = [spec.kind for spec in program.graph_signature.output_specs]
    tensors = [*program.state_dict.values(), *program.constants.values()]
    on_cpu = any(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in tensors)
    return ProgramIndex(
        tuple(lifted),
        outputs.index(kinds.OutputKind.USER_OUTPUT),
        decode_weight_bytes(program),
        cpu_vec_isa() if on_cpu else None,
    )


def write_index(program: torch.export.ExportedProgram, directory: Path) -> None:
    """Write `program`'s index into `directory` (nothing when it has none)."""
    index = index_of(program)
    if index is not None:
        (directory / PROGRAM_INDEX).write_text(index.to_json() + "\n")


def read_index(directory: Path) -> ProgramIndex | None:
    """The index in `directory`, or None for a program written before kiln recorded one."""
    path = directory / PROGRAM_INDEX
    return ProgramIndex.from_json(path.read_text()) if path.is_file() else None
