"""The build's compiled-vs-captured check: reports the difference, and refuses a disagreeing program."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.compiler import verify
from kiln.engine import programs
from kiln.errors import KilnError


class _Step(torch.nn.Module):
    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        cache.add_(1.0)
        return x * 3.0


def _program() -> torch.export.ExportedProgram:
    return torch.export.export(_Step(), (torch.randn(4), torch.randn(1, 1, 1, 1, 1, 2)))


def _compiled_as(program: torch.export.ExportedProgram, shift: float, cache_shift: float):
    eager = programs.EagerProgram(program)

    def run(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        out = eager(x, cache) + shift
        cache.add_(cache_shift)
        return out

    return run


@pytest.mark.parametrize("shift, cache_shift", [(0.0, 0.0), (1e-4, 0.0)])
def test_agreeing_programs_pass_and_report_the_difference(monkeypatch, shift, cache_shift):
    program = _program()
    monkeypatch.setattr(programs, "load_compiled", lambda p, path: _compiled_as(program, shift, cache_shift))
    x, cache = torch.randn(4) * 10, torch.randn(1, 1, 1, 1, 1, 2)
    agreement = verify.check_programs_agree(program, Path("compiled.bin"), (x, cache), torch.float32)
    assert agreement.difference == pytest.approx(shift, abs=1e-6)
    assert agreement.allowed == pytest.approx(1e-3 * max((x * 3).abs().max().item(), 1.0))
    assert "max difference" in str(agreement)


@pytest.mark.parametrize("shift, cache_shift", [(0.5, 0.0), (0.0, 0.5)])
def test_a_disagreeing_output_or_cache_is_refused(monkeypatch, shift, cache_shift):
    program = _program()
    monkeypatch.setattr(programs, "load_compiled", lambda p, path: _compiled_as(program, shift, cache_shift))
    with pytest.raises(KilnError, match=r"compiled.bin disagrees with the captured one \(max difference 0.5"):
        verify.check_programs_agree(
            program, Path("compiled.bin"), (torch.randn(4).clamp(-1, 1), torch.randn(1, 1, 1, 1, 1, 2)), torch.bfloat16
        )
