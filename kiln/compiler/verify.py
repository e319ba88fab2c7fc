"""The build's last check: the saved compiled program and the captured one agree on a real step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kiln.engine import programs
from kiln.errors import KilnError


@dataclass(frozen=True)
class Agreement:
    """The largest difference between the two programs' outputs (and caches), and what it may be."""

    difference: float
    allowed: float

    def __str__(self) -> str:
        return f"max difference {self.difference:.3g} (allowed {self.allowed:.3g})"


def check_programs_agree(
    program: torch.export.ExportedProgram, path: Path, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype
) -> Agreement:
    """Run the compiled program at `path` and `program` op by op on `inputs`, each on its own copy of
    the KV cache (a 6-dim input, if any); the outputs and the caches must agree to 1e-3 (float32) or
    5e-2 (16-bit) times the output's largest magnitude (at least 1), else a KilnError."""
    compiled = programs.load_compiled(program, path)
    eager = programs.EagerProgram(program)
    cache_at = next((i for i, t in enumerate(inputs) if t.dim() == 6), None)
    a, b = list(inputs), list(inputs)
    if cache_at is not None:
        a[cache_at], b[cache_at] = inputs[cache_at].clone(), inputs[cache_at].clone()
    with torch.inference_mode():
        got, want = compiled(*a).float(), eager(*b).float()
    difference = (got - want).abs().max().item()
    if cache_at is not None:
        difference = max(difference, (a[cache_at].float() - b[cache_at].float()).abs().max().item())
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    agreement = Agreement(difference, tolerance * max(want.abs().max().item(), 1.0))
    if not agreement.difference <= agreement.allowed:
        raise KilnError(
            f"the compiled program {path.name} disagrees with the captured one ({agreement}); please report this"
        )
    return agreement
