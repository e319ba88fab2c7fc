"""`kiln build` under torchrun, and the comparison of its engine with the one-process build's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}


def build_under_torchrun(ckpt: Path, output: Path, limits: dict[str, Any], *options: str) -> None:
    """`torchrun --nproc-per-node 2 -m kiln build CKPT -o OUTPUT --no-compile` with `limits` (build options)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in limits.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "kiln"]
    command += ["build", str(ckpt), "-o", str(output), *options, "--no-compile", *flags]
    proc = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no staging directory left behind


def assert_same_engine(mine: Path, theirs: Path) -> None:
    """File for file, byte for byte, but for the build's timings in the manifest."""

    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}

    assert files(mine) == files(theirs)
    for name in files(theirs):
        a, b = (mine / name).read_bytes(), (theirs / name).read_bytes()
        if name.name == "manifest.json":
            a, b = ({**json.loads(m), "timings_s": None} for m in (a, b))
        assert a == b, name
