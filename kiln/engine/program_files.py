"""An engine program on disk: the graph in `program.pt2`, its weights beside it in `weights.safetensors`.

`torch.export.save` would store the weights inside the pt2 archive: for Llama-3.1-8B that took 79 s
of a 3-minute build on the H100 machine. Safetensors writes them faster, releases the GIL while it
does, so the build writes them in a background thread while Inductor compiles, and loads them
straight onto the engine's device. Weights that share a tensor (tied embeddings) are stored once.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path
from types import TracebackType

import torch

from kiln.engine.manifest import PROGRAM, WEIGHTS
from kiln.engine.program_index import LiftedInput

ALIASES_KEY = "kiln.aliases"  # safetensors metadata: {name: stored name} for tensors stored once


def _weights(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Parameters, buffers and tensor constants by name (the names of the two never collide)."""
    constants = {k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}
    return {**program.state_dict, **constants}


def _meta_like(value: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return (
        torch.nn.Parameter(meta, requires_grad=value.requires_grad) if isinstance(value, torch.nn.Parameter) else meta
    )


def without_weights(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """A shallow copy whose weights are meta tensors (same shapes, strides, dtypes): the graph only."""
    light = copy.copy(program)
    light._state_dict = {k: _meta_like(v) for k, v in program.state_dict.items()}
    light._constants = {k: _meta_like(v) if isinstance(v, torch.Tensor) else v for k, v in program.constants.items()}
    return light


def stored_tensors(program: torch.export.ExportedProgram) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (contiguous; one per distinct view) and the aliases of the rest."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[object, ...], str] = {}
    for name, value in _weights(program).items():
        if not value.is_contiguous():
            raise ValueError(f"weight {name} is not contiguous; kiln stores contiguous weights only")
        key = (value.device, value.data_ptr(), tuple(value.shape), value.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = value.detach()
    return stored, aliases


class ProgramWrite:
    """Writes `program.pt2` at once and `weights.safetensors` in a background thread; leaving the
    `with` block waits for the weights and raises a failed write."""

    def __init__(self, program: torch.export.ExportedProgram, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        torch.export.save(without_weights(program), directory / PROGRAM)
        tensors, aliases = stored_tensors(program)
        self._error: BaseException | None = None

        def write() -> None:
            try:
                save_file(tensors, str(directory / WEIGHTS), metadata={ALIASES_KEY: json.dumps(aliases)})
                (directory / WEIGHTS).chmod((directory / PROGRAM).stat().st_mode & 0o777)  # not safetensors' 0600
            except BaseException as exc:  # reported by wait()
                self._error = exc

        self._thread = threading.Thread(target=write, name="kiln-write-weights", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ProgramWrite:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._thread.join()
        if kind is None:
            self.wait()


def save_program(program: torch.export.ExportedProgram, directory: Path) -> None:
    """Write the program and its weights, and return once both are on disk."""
    ProgramWrite(program, directory).wait()


def _stored(directory: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of `directory`'s weights.safetensors on `device`, and its aliases."""
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS), framework="pt", device=str(device)) as f:
        aliases: dict[str, str] = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return tensors, aliases


def load_lifted(directory: Path, device: torch.device, lifted: tuple[LiftedInput, ...]) -> list[torch.Tensor]:
    """The weights `lifted` names, in its order, from `directory`'s weights.safetensors on `device`;
    a missing or mismatched tensor is a ValueError."""
    tensors, aliases = _stored(directory, device)
    values = []
    for spec in lifted:
        stored = aliases.get(spec.name, spec.name)
        if stored not in tensors:
            raise ValueError(f"{WEIGHTS} has no tensor {stored}")
        spec.check(tensors[stored])
        values.append(tensors[stored])
    return values


def attach_weights(program: torch.export.ExportedProgram, directory: Path, device: torch.device) -> None:
    """Put the weights of `directory`'s weights.safetensors, on `device`, into `program` (loaded from
    its program.pt2); a missing or mismatched tensor is a ValueError."""
    tensors, aliases = _stored(directory, device)
    for table in (program.state_dict, program.constants):
        for name, old in list(table.items()):
            if not isinstance(old, torch.Tensor):
                continue
            stored = aliases.get(name, name)
            if stored not in tensors:
                raise ValueError(f"{WEIGHTS} has no tensor {stored}")
            value = tensors[stored]
            if value.shape != old.shape or value.dtype != old.dtype:
                raise ValueError(
                    f"{WEIGHTS}: {stored} is {value.dtype} {tuple(value.shape)}, "
                    f"the program wants {old.dtype} {tuple(old.shape)}"
                )
            table[name] = (
                torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value
            )


class _NoEmptyWeightNotices(logging.Filter):
    """torch.export.load warns for each weight saved without bytes (ours are meta tensors on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "frombuffer() on empty bytes" not in record.getMessage()


def load_graph(path: Path) -> torch.export.ExportedProgram:
    """A program.pt2 as `without_weights` saved it: weights are meta tensors until `attach_weights`."""
    logger = logging.getLogger("torch.export.pt2_archive._package")
    quiet = _NoEmptyWeightNotices()
    logger.addFilter(quiet)
    try:
        return torch.export.load(path)
    finally:
        logger.removeFilter(quiet)


def load_exported(directory: Path, device: torch.device) -> torch.export.ExportedProgram:
    """The program in `directory` with its weights on `device`."""
    program = load_graph(directory / PROGRAM)
    attach_weights(program, directory, device)
    return program


__all__ = [
    "ALIASES_KEY",
    "ProgramWrite",
    "attach_weights",
    "load_graph",
    "load_exported",
    "load_lifted",
    "save_program",
    "stored_tensors",
    "without_weights",
]
