"""The Python modules a new process must import before it can load a program.

A program may call operators that Python code registers when imported (transformers' MoE code
registers `transformers::grouped_mm_fallback`). torch registers its own namespaces at import and the
runtime imports `kiln.kernels`; for every other operator the build finds the modules that define it
and its kernels, and the manifest records them (`Manifest.op_modules`).

Where an operator's code lives: a `torch.library.custom_op` keeps its functions (`OPDEFS`); any other
registration is found by the files torch's dispatcher and fake-kernel registry record for it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator

import torch

from kiln.errors import UnsupportedModelError

BUILTIN_NAMESPACES = frozenset({"aten", "prims", "prim", "kiln"})  # registered by `import torch` / kiln.kernels
_TORCH_DIR = os.path.dirname(os.path.realpath(torch.__file__))
_PLUMBING = (os.path.join(_TORCH_DIR, "library.py"), os.path.join(_TORCH_DIR, "_library") + os.sep)
_PLUMBING_MODULES = ("torch._library", "torch.library")
_REGISTERED_AT = re.compile(r"registered at (\S+?):\d+")


def called_operators(program: torch.export.ExportedProgram) -> set[torch._ops.OpOverload]:
    """Every operator overload a call_function node calls, in the graph and its subgraphs."""
    ops = set()
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                    ops.add(node.target)
    return ops


def _custom_op_functions(qualname: str) -> Iterator[object]:
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(qualname)
    if opdef is None:
        return
    yield getattr(opdef, "_init_fn", None)
    yield from getattr(opdef, "_backend_fns", {}).values()
    yield getattr(opdef, "_abstract_fn", None)


def _registration_files(qualname: str) -> list[str]:
    """Files that torch records as registering the operator: its definition first, then its kernels."""
    files = _REGISTERED_AT.findall(torch._C._dispatch_dump(qualname))
    from torch._library import simple_registry

    entry = simple_registry.singleton.find(qualname)
    fake = getattr(getattr(entry, "fake_impl", None), "kernel", None)  # torch >= 2.4
    source = getattr(fake, "source", None)
    if isinstance(source, str):
        files.append(source.rsplit(":", 1)[0])
    return files


def _modules_by_file() -> dict[str, str]:
    by_file: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            by_file.setdefault(os.path.realpath(path), name)
    return by_file


def registering_modules(op: torch._ops.OpOverload, by_file: dict[str, str] | None = None) -> tuple[str, ...]:
    """The modules whose import registers `op` and its kernels; () for an operator registered in C++.

    Refuses an operator registered by Python code that a new process cannot import."""
    qualname = op._schema.name
    found: list[str] = []
    for function in _custom_op_functions(qualname):
        name = getattr(function, "__module__", None)
        if isinstance(name, str) and not name.startswith(_PLUMBING_MODULES):
            found.append(name)
    python_files = [f for f in _registration_files(qualname) if f.endswith(".py")]
    if by_file is None:
        by_file = _modules_by_file()
    for path in python_files:
        real = os.path.realpath(path)
        if real.startswith(_PLUMBING):
            continue
        if real in by_file:
            found.append(by_file[real])
    modules = tuple(dict.fromkeys(found))
    if python_files and not modules:
        raise UnsupportedModelError(
            f"the program calls the operator {qualname}, and kiln cannot tell which module registers it, "
            "so a new process could not load the engine"
        )
    if "__main__" in modules:
        raise UnsupportedModelError(
            f"the program calls the operator {qualname}, which the running script (__main__) registers; "
            "a new process cannot import that script: define the operator in an importable module"
        )
    return modules


def op_modules(program: torch.export.ExportedProgram) -> dict[str, tuple[str, ...]]:
    """{operator: modules that register it} for the operators outside torch's namespaces and kiln's."""
    ops = sorted(
        (op for op in called_operators(program) if op.namespace not in BUILTIN_NAMESPACES), key=lambda o: o.name()
    )
    by_file = _modules_by_file() if ops else {}
    found = {op._schema.name: registering_modules(op, by_file) for op in ops}
    return {name: modules for name, modules in found.items() if modules}
