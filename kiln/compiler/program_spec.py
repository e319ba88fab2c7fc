"""What the build pipeline needs to know about one program of an engine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from kiln.errors import KilnError


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, kw_only=True)
class ProgramSpec:
    """One program to export, check, rewrite, write, compile and verify (`kiln.compiler.pipeline`).

    The LLM program of an engine is written at its root (`directory=""`), a vision program in `vision/`.
    Programs with a KV cache (`cache` set) get the graph passes, and each attention site is checked
    against the cache layout; a vision program has no cache and is exported as it is.
    """

    module: nn.Module | None  # called on `args` by torch.export; None once exported (`exported()`)
    args: tuple[torch.Tensor, ...]  # the example inputs torch.export traces
    dynamic_shapes: tuple[Any, ...]  # one entry per input, as torch.export takes them
    what: str  # names the program in messages: "LlamaForCausalLM", "the vision encoder of ..."
    architecture: str  # the model's architecture, for the passes
    directory: str = ""  # the engine sub-directory the program is written to
    input_names: tuple[str, ...] = ()  # the program's user inputs; empty: the text engine's INPUT_NAMES
    check_inputs: tuple[torch.Tensor, ...] = ()  # the step the compiled program is verified on; empty: args
    cache: CacheShape | None = None  # the KV-cache layout every attention site must fit
    passes: bool = True  # whether the graph passes (paged attention, fusions) apply

    def __post_init__(self) -> None:
        if self.passes and self.cache is None:
            raise KilnError(f"the program of {self.what} has no KV cache, so the attention passes cannot apply")

    def exported(self) -> "ProgramSpec":
        """The spec without its module: what the write, compile and verify steps need, so that the
        source model's weights that the passes replaced (fused projections) can be freed first."""
        return replace(self, module=None)

    @property
    def verify_inputs(self) -> tuple[torch.Tensor, ...]:
        return self.check_inputs or self.args

    @property
    def stage_suffix(self) -> str:
        """Appended to the progress stages: "export vision", "compile vision"... for a program in vision/."""
        return f" {self.directory}" if self.directory else ""
