"""The low-level API example builds a custom vision-language engine and matches transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_custom_vlm_example(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/custom_vlm.py", "--no-compile", "--out", str(tmp_path / "engine")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(matches transformers: True)") == 2
