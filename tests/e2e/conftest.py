import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from e2e_helpers import DEMO, kiln  # noqa: E402


def _build_demo(out: Path) -> None:
    # Exactly the README quickstart's build: no limits given, so they come from the model
    # (max_position_embeddings 512 -> max_seq_len 512, max_input_len 512).
    proc = kiln("build", str(DEMO), "-o", str(out))
    for stage in ("load", "export", "passes", "write", "compile", "verify"):
        assert f"✓ {stage}" in proc.stderr, f"build did not report stage {stage}:\n{proc.stderr}"
    assert "Loading weights" not in proc.stderr and "it/s" not in proc.stderr  # no transformers progress bar
    # the passes that changed the graph, with what they changed; the checks change nothing
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    for name, change in passes.items():
        assert f"{name}: {change}" in proc.stderr
    assert "check_attention" not in proc.stderr


@pytest.fixture(scope="session")
def demo_engine(build_once) -> Path:
    """The demo's compiled engine, built once per run (the xdist workers share it)."""
    out = build_once("demo-engine", _build_demo)
    passes = json.loads((out / "manifest.json").read_text())["passes"]
    assert passes["paged_attention"] == "4 sites" and passes["fuse_projections"] == "8 sites"  # 4 layers
    assert "check_attention_captured" not in passes
    assert (out / "compiled.bin").is_file() and (out / "program.pt2").is_file()
    return out
