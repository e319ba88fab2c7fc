"""Inductor compilation of the engine program, done once at build and loaded at run time.

The transformed exported program is compiled with `torch._inductor.standalone_compile` on the
program's own fake inputs, so the compiled code keeps torch.export's symbolic sizes: one compiled
graph serves every token count, batch size and cache size (no re-tracing, no size-1
specialisation). The result is saved as a `CompiledArtifact` in the engine directory; loading it
restores the generated code (and, on GPU, the compiled kernels) instead of compiling again
(`kiln.engine.programs.load_compiled`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def config_patches(devices: set[torch.device], *, combo_kernels: bool = True) -> dict[str, Any]:
    """Inductor options for a program on `devices`.

    Everywhere: `emulate_precision_casts`, so that fused elementwise kernels round their fp16/bf16
    intermediates as the captured program does, instead of carrying them in float32. Without it a
    Llama-3.1-8B bf16 step (random weights) differed from its captured program by as much as
    transformers' own bf16 logits differ from its float32 ones (max 0.29 at a logit scale of 5.8:
    `benchmarks/compile_agreement.py`), and the build's check could not tell that from an error.
    On CUDA: programmatic dependent launch for the Triton kernels on Hopper and newer GPUs (see
    `kiln.kernels.triton.pdl`; on when the kernel selection's `pdl` is), when this torch has the
    option, and, with `combo_kernels`, combo kernels (independent small kernels, such as the rotary
    embedding of q and of k, launched as one: -15 µs on the Llama-3.2-1B decode step)."""
    patches: dict[str, Any] = {}
    if hasattr(torch._inductor.config, "emulate_precision_casts"):
        patches["emulate_precision_casts"] = True
    devices = {d for d in devices if d.type == "cuda"}
    if not devices:
        return patches
    patches["combo_kernels"] = combo_kernels
    if hasattr(torch._inductor.config.triton, "enable_pdl"):
        try:
            from kiln.kernels.triton.pdl import enabled
        except ImportError:  # no triton
            return patches
        patches["triton.enable_pdl"] = all(enabled(d) for d in devices)
    return patches


def compile_program(program: torch.export.ExportedProgram, path: Path, *, combo_kernels: bool = True) -> None:
    """Compile the lifted graph with its symbolic shapes and save the artifact at `path`
    (`combo_kernels`: BuildConfig.combo_kernels; PDL follows the current kernel selection)."""
    from torch._inductor import standalone_compile

    graph_module = program.graph_module
    fakes = [n.meta["val"] for n in graph_module.graph.nodes if n.op == "placeholder"]
    fake_mode = next(t.fake_mode for t in fakes if isinstance(t, torch._subclasses.fake_tensor.FakeTensor))
    with (
        torch.no_grad(),
        torch._guards.tracing(torch._guards.TracingContext(fake_mode)),
        torch._inductor.config.patch(
            config_patches({t.device for t in fakes if isinstance(t, torch.Tensor)}, combo_kernels=combo_kernels)
        ),
    ):
        artifact = standalone_compile(graph_module, fakes, dynamic_shapes="from_tracing_context", options={})
    artifact.save(path=str(path), format="binary")
