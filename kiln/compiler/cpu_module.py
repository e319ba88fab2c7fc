"""Write a CPU program's Inductor output code and kernels as `cpu_module/` (see `kiln.engine.cpu_module`).

The saved artifact is loaded here, in the build, which runs its generated module: that module's source
is rewritten (its imports of torch._inductor point at `kiln.engine.cpu_runtime`, each
`async_compile.cpp_pybinding(...)` becomes `_kiln_kernel(name)`) and the library Inductor built for each
kernel is copied. Anything this does not recognise leaves no `cpu_module/` (the engine then loads
through the artifact). The written module is loaded the way an engine loads it and must give outputs
and a KV cache bitwise equal to the artifact's on the build's verify inputs.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from kiln.engine.cpu_module import CPU_MODULE, FACTS, KERNELS, SOURCE, ModuleFacts, cpu_flags, load_module

# (module, name) Inductor's output code imports -> the name kiln.engine.cpu_runtime gives it
_SHIMS = {
    ("torch._inductor.async_compile", "AsyncCompile"): "AsyncCompile",
    ("torch._inductor.select_algorithm", "extern_kernels"): "extern_kernels",
    ("torch._inductor.codegen.memory_planning", "_align"): "align",
    ("torch._inductor.utils", "maybe_profile"): None,  # imported, must be unused
    ("torch._inductor.hooks", "run_intermediate_hooks"): None,
}
_HEAVY = ("torch._inductor", "torch._dynamo")
_UNRUN = {"get_args", "benchmark_compiled_module"}  # the module's benchmark harness, never called


class Unsupported(Exception):
    """The output module does something the rewrite does not handle."""


def _output_module(artifact: Any) -> Any:
    """The loaded Python module behind a CacheCompiledArtifact (found through its wrappers' closures)."""
    seen: set[int] = set()
    todo = [artifact._compiled_fn]
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        call = getattr(fn, "current_callable", None)
        if call is not None and hasattr(fn, "source_code"):
            return sys.modules[call.__module__]
        todo.extend(cell.cell_contents for cell in getattr(fn, "__closure__", None) or ())
    raise Unsupported("no Inductor output module behind the artifact")


def _is_kernel_assign(node: ast.stmt) -> str | None:
    """`name` for `name = async_compile.cpp_pybinding(...)`."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
        return None
    value = node.value
    if isinstance(value, ast.Call) and ast.unparse(value.func) == "async_compile.cpp_pybinding":
        return node.targets[0].id
    if isinstance(value, ast.Call) and ast.unparse(value.func).startswith("async_compile."):
        raise Unsupported(f"kernel kind {ast.unparse(value.func)}")
    return None


def _rewrite_import(node: ast.ImportFrom) -> str:
    names = []
    for alias in node.names:
        key = (node.module or "", alias.name)
        if key not in _SHIMS:
            raise Unsupported(f"import of {key[1]} from {key[0]}")
        shim = _SHIMS[key]
        if shim is not None:
            names.append(f"{shim} as {alias.asname or alias.name}")
    return f"from kiln.engine.cpu_runtime import {', '.join(names)}" if names else "pass"


def rewrite(source: str) -> tuple[str, list[str]]:
    """The module's source for `kiln.engine.cpu_module.load_module`, and its kernel names in order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    kernels: list[str] = []
    replaced: dict[int, tuple[int, str]] = {}  # first line -> (last line, replacement)
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.startswith(_HEAVY) for a in node.names):
            raise Unsupported(ast.unparse(node))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(_HEAVY):
            replaced[node.lineno] = (node.end_lineno or node.lineno, _rewrite_import(node))
        elif (name := _is_kernel_assign(node)) is not None:
            kernels.append(name)
            replaced[node.lineno] = (node.end_lineno or node.lineno, f"{name} = _kiln_kernel({name!r})")
    out: list[str] = []
    skip_to = 0
    for number, line in enumerate(lines, start=1):
        if number <= skip_to:
            continue
        if number in replaced:
            skip_to, text = replaced[number]
            out.append(text)
        else:
            out.append(line)
    result = "\n".join(out) + "\n"
    _check_light(ast.parse(result))
    return result, kernels


def _check_light(tree: ast.Module) -> None:
    """The code that runs (all but the benchmark harness) names no torch._inductor / torch._dynamo, nor
    the names the rewrite left unbound."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in _UNRUN:
            continue
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring (Inductor's compile-time autotuning block)
        text = ast.unparse(node)
        if any(heavy in text for heavy in _HEAVY):
            raise Unsupported(f"code naming torch internals: {text[:80]}")
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in ("maybe_profile", "run_intermediate_hooks"):
                raise Unsupported(f"uses {sub.id}")


def _check_shims(source: str) -> None:
    """kiln.engine.cpu_runtime's names are Inductor's for this program."""
    from torch._inductor import utils
    from torch._inductor.select_algorithm import extern_kernels

    from kiln.engine import cpu_runtime

    if utils.ALIGN_BYTES != cpu_runtime.ALIGN_BYTES:
        raise Unsupported(f"Inductor aligns to {utils.ALIGN_BYTES} bytes")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "extern_kernels":
            if getattr(extern_kernels, node.attr, None) is not getattr(torch, node.attr, object()):
                raise Unsupported(f"extern kernel {node.attr} is not torch.{node.attr}")


def _write(artifact: Any, directory: Path) -> None:
    module = _output_module(artifact)
    source = Path(module.__file__).read_text()
    light, kernels = rewrite(source)
    _check_shims(source)
    if not cpu_flags():
        raise Unsupported("no /proc/cpuinfo flags to record")
    (directory / KERNELS).mkdir(parents=True)
    for name in kernels:
        library = getattr(getattr(module, name), "__self__", None)
        path = getattr(library, "__file__", None)
        if path is None or not str(path).endswith(".so"):
            raise Unsupported(f"kernel {name} has no library")
        shutil.copyfile(path, directory / KERNELS / f"{name}.so")
    (directory / SOURCE).write_text(light)
    (directory / FACTS).write_text(ModuleFacts.here(kernels).to_json() + "\n")


def _check_equal(artifact: Any, directory: Path, state: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
    """The written module gives the artifact's outputs and KV cache, bit for bit."""
    call = load_module(directory)
    cache_at = next((i for i, t in enumerate(inputs) if t.dim() == 6), None)
    a, b = list(inputs), list(inputs)
    if cache_at is not None:
        a[cache_at], b[cache_at] = inputs[cache_at].clone(), inputs[cache_at].clone()
    with torch.inference_mode():
        want, got = artifact(*state, *a), call([*state, *b])
    if len(want) != len(got) or not all(torch.equal(x, y) for x, y in zip(want, got, strict=True)):
        raise Unsupported("its outputs differ from the artifact's")
    if cache_at is not None and not torch.equal(a[cache_at], b[cache_at]):
        raise Unsupported("its KV cache differs from the artifact's")


def write_cpu_module(compiled: Path, state: list[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> str:
    """Write `cpu_module/` beside the CPU artifact `compiled` (its weights `state`, checked on `inputs`);
    says what was done (a module that cannot be written or does not agree is left out)."""
    from torch._inductor import CompiledArtifact

    directory = compiled.parent / CPU_MODULE
    shutil.rmtree(directory, ignore_errors=True)
    try:
        artifact = CompiledArtifact.load(path=str(compiled), format="binary")
        _write(artifact, directory)
        _check_equal(artifact, directory, state, inputs)
    except Exception as exc:  # torch internals this does not know: the artifact still loads
        shutil.rmtree(directory, ignore_errors=True)
        reason = str(exc) if isinstance(exc, Unsupported) else f"{type(exc).__name__}: {exc}"
        return f"no {CPU_MODULE}/ (the engine loads through {compiled.name}): {reason}"
    kernels = len(list((directory / KERNELS).iterdir()))
    return f"{CPU_MODULE}/: the output code and {kernels} kernel libraries, loaded without torch._inductor"
