"""Graph passes over the captured program, applied in the order of `PASSES`.

Each pass lives in its own module and is a pure function `(ExportedProgram, PassContext) ->
PassResult`: it rewrites a copy of the graph, shares the weights and counts the sites it rewrote.
Which passes run depends on the BuildConfig (`active_passes`); `describe(build)` prints them in order.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kiln.compiler.passes.check_attention_captured import check_attention_captured
from kiln.compiler.passes.check_attention_rewritten import check_attention_rewritten
from kiln.compiler.passes.context import PassContext, PassResult
from kiln.compiler.passes.fuse_gated_activation import fuse_gated_activation
from kiln.compiler.passes.fuse_projections import fuse_projections
from kiln.compiler.passes.fuse_residual_add import fuse_residual_add
from kiln.compiler.passes.fuse_rms_norm import fuse_rms_norm
from kiln.compiler.passes.fuse_rope import fuse_rope
from kiln.compiler.passes.fuse_silu_mul import fuse_silu_mul
from kiln.compiler.passes.gather_before_norm import gather_before_norm
from kiln.compiler.passes.image_attention_limits import image_attention_limits
from kiln.compiler.passes.outer_products import outer_products
from kiln.compiler.passes.paged_attention import paged_attention
from kiln.compiler.passes.prefetch_output_weights import prefetch_output_weights
from kiln.compiler.passes.quantize_linears import quantize_linears
from kiln.compiler.passes.small_batch_linear import small_batch_linear
from kiln.config import BuildConfig

Pass = Callable[[torch.export.ExportedProgram, PassContext], PassResult]

PASSES: list[Pass] = [
    check_attention_captured,
    paged_attention,
    image_attention_limits,
    check_attention_rewritten,
    fuse_projections,  # before small_batch_linear: it rewrites the fused linears
    gather_before_norm,  # the final norm on the logits rows only, right before lm_head
    outer_products,
    small_batch_linear,
    prefetch_output_weights,  # after small_batch_linear: it looks for kiln.linear
]

# Fused decode linears (norm / activation prologue, residual / rotary epilogue): 96 fewer kernels
# per Llama-3.2-1B decode step. They rewrite kiln::linear nodes, so CUDA fp16/bf16 programs only.
# BuildConfig.fused_linears=False leaves them out.
FUSED_LINEAR_PASSES: list[Pass] = [
    fuse_silu_mul,  # before fuse_residual_add: the down projection takes both
    fuse_residual_add,
    fuse_rms_norm,
    fuse_rope,  # after fuse_rms_norm: it takes the normed q/k/v projection as it is
    fuse_gated_activation,  # after fuse_silu_mul and fuse_rms_norm: moves the activation into gate/up
]


# Weight-only quantization, after every other pass: it packs the weights of the linears the
# passes before it fused, whatever op reads them. Active when the build quantizes or the
# checkpoint comes quantized.
QUANTIZATION_PASSES: list[Pass] = [quantize_linears]


def active_passes(build: BuildConfig, quantized: bool = False) -> list[Pass]:
    """PASSES, then FUSED_LINEAR_PASSES when `build.fused_linears` (all but `fuse_rope` when
    `build.fuse_rope` is false: to time its kernels against Inductor's), then QUANTIZATION_PASSES when
    `build.quantization` is set or the checkpoint's linears are `quantized`."""
    passes = list(PASSES)
    if build.fused_linears:
        passes += [p for p in FUSED_LINEAR_PASSES if p is not fuse_rope or build.fuse_rope]
    if quantized or build.quantization != "none":
        passes += QUANTIZATION_PASSES
    return passes


def describe(build: BuildConfig, quantized: bool = False) -> list[str]:
    return [f"{p.__name__}: {(p.__doc__ or '').strip().splitlines()[0]}" for p in active_passes(build, quantized)]


@dataclass(frozen=True)
class PassesRun:
    """The program after every active pass, and the sites each pass that changed it rewrote (in order)."""

    program: torch.export.ExportedProgram
    changes: dict[str, int]

    def summary(self) -> dict[str, str]:
        """{pass: "16 sites"} of the passes that changed the program, as the build prints and the manifest keeps."""
        return {name: f"{sites} site{'s' if sites != 1 else ''}" for name, sites in self.changes.items()}


def run_passes(
    program: torch.export.ExportedProgram,
    context: PassContext,
    on_pass: Callable[[str, int], None] | None = None,
) -> PassesRun:
    """Every active pass in order; `on_pass(name, sites)` after each one."""
    changes: dict[str, int] = {}
    with warnings.catch_warnings():  # torch's own pytree deprecation notice while programs are copied
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        for graph_pass in active_passes(context.build, context.quantized is not None):
            result = graph_pass(program, context)
            program = result.program
            if result.sites:
                changes[graph_pass.__name__] = result.sites
            if on_pass is not None:
                on_pass(graph_pass.__name__, result.sites)
    return PassesRun(program, changes)


__all__ = [
    "FUSED_LINEAR_PASSES",
    "PASSES",
    "QUANTIZATION_PASSES",
    "Pass",
    "PassContext",
    "PassResult",
    "PassesRun",
    "active_passes",
    "describe",
    "run_passes",
]
