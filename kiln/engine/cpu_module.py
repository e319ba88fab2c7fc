"""A CPU program's Inductor output code and compiled kernels, loaded without torch._inductor.

On the CPU a compiled program is a Python module that Inductor generated (its `call` runs the graph)
and one shared library per fused kernel. Loading it through `CompiledArtifact` imports torch._dynamo
and torch._inductor and checks the CPU's ISA extensions in child processes: about two seconds. The
build (`kiln.compiler.cpu_module`) therefore also writes `cpu_module/`: that module, its imports of
torch._inductor pointed at `kiln.engine.cpu_runtime`, the libraries, and `facts.json` saying what
they need. The loader takes it only when this process has the same torch and Python and this CPU
has every flag the build's had; otherwise (or when anything in it fails to load) the engine loads
through the artifact as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CPU_MODULE = "cpu_module"  # directory beside compiled.bin
SOURCE = "module.py"
FACTS = "facts.json"
KERNELS = "kernels"
_VERSION = 1

Call = Callable[[list[torch.Tensor]], Sequence[torch.Tensor]]


def cpu_flags() -> frozenset[str]:
    """The flags /proc/cpuinfo gives this CPU (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class ModuleFacts:
    """What the module's libraries were built against."""

    torch: str  # torch.__version__
    python: str  # sys.implementation.cache_tag
    cpu_flags: frozenset[str]
    kernels: tuple[str, ...]  # the module's kernel names, one library each

    @classmethod
    def here(cls, kernels: Sequence[str]) -> ModuleFacts:
        return cls(torch.__version__, sys.implementation.cache_tag, cpu_flags(), tuple(kernels))

    def usable(self) -> bool:
        """Whether this process and CPU can run libraries built under these facts."""
        here = ModuleFacts.here(self.kernels)
        return (
            bool(self.cpu_flags)
            and (self.torch, self.python) == (here.torch, here.python)
            and (self.cpu_flags <= here.cpu_flags)
        )

    def to_json(self) -> str:
        data = {"version": _VERSION, "torch": self.torch, "python": self.python}
        return json.dumps({**data, "cpu_flags": sorted(self.cpu_flags), "kernels": list(self.kernels)})

    @classmethod
    def from_json(cls, text: str) -> ModuleFacts:
        data = json.loads(text)
        if data["version"] != _VERSION:
            raise ValueError(f"{FACTS} version {data['version']}, this kiln reads {_VERSION}")
        return cls(data["torch"], data["python"], frozenset(data["cpu_flags"]), tuple(data["kernels"]))


def _load_library(path: Path) -> Any:
    """The `kernel` function of one of Inductor's Python-binding libraries."""
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(f"kiln_cpu_{tag}.kernel", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a loadable library")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def load_module(directory: Path) -> Call:
    """The `call` of the module in `directory` (a `cpu_module/`), its kernels loaded from the libraries."""
    facts = ModuleFacts.from_json((directory / FACTS).read_text())
    source = (directory / SOURCE).read_text()
    # The libraries read torch's tensor data-pointer function from this variable when loaded (as Inductor sets it).
    pointer = getattr(torch._C._dynamo.guards, "_torchinductor_pyobject_tensor_data_ptr", None)
    if pointer is not None:
        os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(pointer)

    def kernel(name: str) -> Any:
        if name not in facts.kernels:
            raise KeyError(f"{directory / FACTS} lists no kernel {name}")
        return _load_library(directory / KERNELS / f"{name}.so")

    namespace: dict[str, Any] = {"__name__": f"kiln_cpu_module_{id(directory)}", "_kiln_kernel": kernel}
    exec(compile(source, str(directory / SOURCE), "exec"), namespace)
    return namespace["call"]


def usable_module(directory: Path) -> Path | None:
    """`directory`'s cpu_module/ when it is there and usable here, else None."""
    path = directory / CPU_MODULE
    facts = path / FACTS
    if not facts.is_file():
        return None
    try:
        return path if ModuleFacts.from_json(facts.read_text()).usable() else None
    except (ValueError, KeyError, OSError):
        return None


class ModuleProgram:
    """A CPU module's `call` fed with the program's weights (`state`), giving the user's output."""

    def __init__(self, call: Call, state: list[torch.Tensor], output: int) -> None:
        self.call = call
        self.state = state
        self.output = output

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()  # the artifact's wrapper runs inference graphs without grad
        if grad:
            torch._C._set_grad_enabled(False)
        try:
            return self.call([*self.state, *inputs])[self.output]
        finally:
            if grad:
                torch._C._set_grad_enabled(True)
