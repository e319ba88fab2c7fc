"""torch.export of a `ProgramSpec`, with a failure named after the program."""

from __future__ import annotations

import torch

from kiln.compiler.program_spec import ProgramSpec
from kiln.errors import KilnError, UnsupportedModelError


def export_program(spec: ProgramSpec) -> torch.export.ExportedProgram:
    """torch.export of `spec.module` on `spec.args` with its dynamic shapes; any failure but kiln's own
    is an UnsupportedModelError that names the program and the first line of the cause."""
    if spec.module is None:
        raise KilnError(f"the spec of {spec.what} was already exported: its module is gone")
    try:
        with torch.no_grad():
            return torch.export.export(spec.module.eval(), spec.args, dynamic_shapes=spec.dynamic_shapes)
    except KilnError:
        raise
    except Exception as exc:  # torch.export raises many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.export could not capture {spec.what}: {type(exc).__name__}: {first_line}"
        ) from exc
