"""Custom operators called before anything imports torch._dynamo run without importing it (torch's own
guard would import it at the first call), and get Dynamo's guard once it is imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys, torch

@torch.library.custom_op("kiln_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2

if sys.argv[1] == "deferred":
    from kiln.engine.dynamo_free import defer_dynamo_import
    print("guarded", defer_dynamo_import())
first = torch.ops.kiln_test.double(torch.ones(2)).tolist()
print("dynamo after the first call", "torch._dynamo" in sys.modules)
import torch._dynamo
second = torch.ops.kiln_test.double(torch.ones(2)).tolist()
print("calls", first, second)
"""


def _run(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), mode], capture_output=True, text=True, cwd=REPO, check=True
    )
    return done.stdout


def test_torch_imports_dynamo_at_a_custom_operator_s_first_call():
    assert "dynamo after the first call True" in _run("torch")


def test_deferred_operators_run_without_it_and_with_dynamo_s_guard_once_imported():
    out = _run("deferred")
    assert "guarded 0" not in out and "guarded" in out
    assert "dynamo after the first call False" in out
    assert "calls [2.0, 2.0] [2.0, 2.0]" in out
