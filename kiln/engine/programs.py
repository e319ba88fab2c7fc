"""Loading an engine program: the exported graph with its weights, run op by op or as its compiled artifact.

`load_program` is the one loader of the engine's programs (the LLM program at the engine's root, the
vision program in `vision/`): a damaged or missing file is an `EngineMismatchError` that names the
file and says to rebuild. The modules that register the operators a program calls outside torch's and
kiln's namespaces (the manifest's `op_modules`) are imported first; one that fails is named with its operator.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kiln.engine.cpu_module import ModuleProgram, load_module, usable_module
from kiln.engine.dynamo_free import defer_dynamo_import
from kiln.engine.manifest import COMPILED, PROGRAM, PROGRAM_INDEX, WEIGHTS
from kiln.engine.program_files import attach_weights, load_graph, load_lifted
from kiln.engine.program_index import ProgramIndex, cpu_vec_isa, read_index
from kiln.engine.weight_bytes import decode_weight_bytes
from kiln.errors import EngineMismatchError, KilnError

_log = logging.getLogger(__name__)


class Program(Protocol):
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...


def lifted_state(program: torch.export.ExportedProgram) -> list[torch.Tensor]:
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
    """A loaded CompiledArtifact fed with the program's weights (`state`, in the lifted graph's order)."""

    def __init__(self, artifact: Any, state: list[torch.Tensor], output: int) -> None:
        self.artifact = artifact
        self.state = state
        self.output = output

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.artifact(*self.state, *inputs)[self.output]


def _isa_probe_needless(built_for: str | None) -> bool:
    """Whether the CPU vector ISA Inductor picks from this CPU's flags alone is the one the build picked.

    Inductor otherwise checks each ISA the CPU reports at every load, by compiling a probe and loading
    it in a child Python (torch's checks of ISA extensions, which set compiler flags, still run). When
    the two differ (an engine from another CPU) Inductor probes as before and compiles its kernels for
    this CPU."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    if built_for is None:
        return False
    with config.patch({"cpp.vec_isa_ok": True}):
        same = cpu_vec_isa() == built_for
    if not same:
        valid_vec_isa_list.cache_clear()  # picked from the flags alone: probe again
    return same


def _load_artifact(path: Path, vec_isa: str | None = None) -> Any:
    from torch._inductor import CompiledArtifact, config

    if not path.is_file():
        raise KilnError(f"{path} is missing: the engine's compiled program is gone; rebuild the engine")
    skip = _isa_probe_needless(vec_isa)
    with config.patch({"cpp.vec_isa_ok": True}) if skip else contextlib.nullcontext():
        return CompiledArtifact.load(path=str(path), format="binary")


def load_compiled(program: torch.export.ExportedProgram, path: Path) -> CompiledProgram:
    """The artifact `kiln.compiler.inductor.compile_program` saved at `path`, fed with `program`'s weights."""
    return CompiledProgram(_load_artifact(path), lifted_state(program), _user_output_index(program))


def load_indexed(index: ProgramIndex, directory: Path, state: list[torch.Tensor]) -> Program:
    """The compiled program in `directory` fed with `state`, the weights its index lists (no torch.export.load):
    its `cpu_module/` where there is one this process and CPU can run, else its artifact."""
    module = usable_module(directory) if index.vec_isa is not None else None
    if module is not None:
        try:
            program = ModuleProgram(load_module(module), state, index.output)
            defer_dynamo_import()  # else the first call of a custom operator imports torch._dynamo
            return program
        except Exception:  # a damaged or foreign cpu_module/: the artifact holds the same program
            _log.debug("%s cannot be loaded; loading %s instead", module, COMPILED, exc_info=True)
    return CompiledProgram(_load_artifact(directory / COMPILED, index.vec_isa), state, index.output)


@dataclass(frozen=True)
class LoadedProgram:
    """A program ready to call, and the bytes of weights one decode step reads (see `decode_weight_bytes`)."""

    program: Program
    weight_bytes: int


def is_registered(op: str) -> bool:
    """Whether the operator `namespace::name` is registered in this process."""
    namespace, _, name = op.partition("::")
    return hasattr(getattr(torch.ops, namespace), name)


def import_op_modules(op_modules: Mapping[str, Sequence[str]]) -> None:
    """Import the modules that register each operator; a failed import or a missing operator is an
    EngineMismatchError that names both."""
    for op, modules in op_modules.items():
        for module in modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                raise EngineMismatchError(
                    f"the engine's program calls the operator {op}, which the module {module} registers, and "
                    f"{module} cannot be imported here ({type(exc).__name__}: {exc}); install the package that "
                    "provides it (the manifest names the versions the engine was built with) or rebuild the engine"
                ) from exc
        if not is_registered(op):
            raise EngineMismatchError(
                f"the engine's program calls the operator {op}, and importing {', '.join(modules)} did not register "
                "it here (another version of that package?); rebuild the engine with `kiln build`"
            )


_TARGET = re.compile(r'"target":\s*"torch\.ops\.(\w+)\.(\w+)\.\w+"')


def unregistered_operators(path: Path) -> list[str]:
    """Operators the program.pt2 at `path` calls that no module registered in this process (best effort)."""
    with zipfile.ZipFile(path) as archive:
        graphs = [archive.read(n).decode() for n in archive.namelist() if re.search(r"/models/[^/]+\.json$", n)]
    ops = {f"{ns}::{name}" for text in graphs for ns, name in _TARGET.findall(text)}
    return sorted(op for op in ops if not is_registered(op))


def _check_operators(path: Path) -> None:
    """Name the operators torch.export.load would not resolve (before it logs a traceback of its own)."""
    missing = unregistered_operators(path)
    if missing:
        raise EngineMismatchError(
            f"{path} calls operators that no module imported here registers: {', '.join(missing)}. Its manifest "
            "names no module to import for them (built by an older kiln?): rebuild the engine with `kiln build`"
        )


def load_program(
    directory: Path, device: torch.device, *, compiled: bool, op_modules: Mapping[str, Sequence[str]] | None = None
) -> LoadedProgram:
    """The program stored in `directory` (program.pt2, its weights, and compiled.bin when `compiled`),
    with its weights on `device`, once `op_modules` (the manifest's) are imported; a file that cannot be
    loaded is an EngineMismatchError naming it."""
    import_op_modules(op_modules or {})
    path = directory / PROGRAM
    try:
        if not zipfile.is_zipfile(path):  # before torch, which logs a traceback of its own
            raise ValueError("not a torch.export archive")
        _check_operators(path)
        path = directory / PROGRAM_INDEX
        # The index path (no torch.export.load) is taken on the CPU only until it has run on a GPU; a CUDA
        # engine loads as before.
        index = read_index(directory) if compiled and device.type == "cpu" else None
        path = directory / PROGRAM
        if index is not None:
            path = directory / WEIGHTS
            state = load_lifted(directory, device, index.lifted)
            path = directory / COMPILED
            return LoadedProgram(load_indexed(index, directory, state), index.weight_bytes)
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
