"""`kiln --version`, `kiln --help` and `import kiln` import neither torch nor transformers (a fresh process each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Runs `python -m kiln ARGS` in-process (runpy, as -m does), then reports which heavy modules were imported.
PROBE = """
import json, runpy, sys
sys.argv = ["kiln", *json.loads(sys.argv[1])]
out = None
try:
    if sys.argv[1:] == ["import"]:
        import kiln
        out = kiln.__version__
    else:
        runpy.run_module("kiln", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    out = exc.code
print(json.dumps({"exit": out, "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def probe(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args", [["--version"], ["--help"], ["build", "--help"], ["serve", "--help"], ["eval", "--help"]]
)
def test_cli_paths_that_load_nothing_import_no_torch(args):
    result = probe(args)
    assert result["exit"] == 0, result
    assert result["heavy"] == [], f"`kiln {' '.join(args)}` imported {result['heavy']}"


def test_import_kiln_is_light_and_names_load_on_use():
    import kiln

    assert probe(["import"]) == {"exit": kiln.__version__, "heavy": []}

    assert kiln.SamplingParams.__module__ == "kiln.sampling_params"
    assert "LLM" in dir(kiln)
    assert set(kiln.__all__) == {*kiln._HOMES, "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        kiln.nothing  # noqa: B018
