"""A compiled program loads from the index the build records (no torch.export.load, no probe of the ISA on
the build's CPU); an engine without the index loads through torch.export.load as before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kiln.compiler.pipeline import build_program
from kiln.compiler.program_spec import ProgramSpec
from kiln.config import BuildConfig
from kiln.engine import programs
from kiln.engine.cpu_module import CPU_MODULE, FACTS
from kiln.engine.manifest import PROGRAM_INDEX, WEIGHTS
from kiln.engine.program_index import read_index
from kiln.errors import EngineMismatchError
from kiln.progress import Progress

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


class _Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 8)
        self.register_buffer("scale", torch.rand(8) + 0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(self.proj(pixels)) * self.scale


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    encoder = _Encoder().eval()
    spec = ProgramSpec(
        module=encoder,
        args=(torch.randn(2, 6),),
        dynamic_shapes=({0: torch.export.Dim("images", min=1, max=8)},),
        what="a test program",
        architecture="Test",
        directory="vision",
        passes=False,
    )
    root = tmp_path_factory.mktemp("indexed")
    build_program(spec, root, BuildConfig(compile=True), Progress(enabled=False))
    return root / "vision", encoder


def test_the_index_lists_the_lifted_weights_in_the_graph_s_order(built):
    directory, _ = built
    index = read_index(directory)
    assert index is not None
    exported = programs.load_graph(directory / "program.pt2")
    lifted = [s.target for s in exported.graph_signature.input_specs if s.kind.name != "USER_INPUT"]
    assert [x.name for x in index.lifted] == lifted == ["proj.weight", "proj.bias", "scale"]
    assert [(x.dtype, x.shape) for x in index.lifted] == [("float32", (8, 6)), ("float32", (8,)), ("float32", (8,))]
    assert index.output == 0 and index.weight_bytes == 4 * (48 + 8 + 8)
    assert index.vec_isa == programs.cpu_vec_isa()


def test_a_compiled_program_loads_from_its_index_without_torch_export_load(built, monkeypatch):
    directory, encoder = built
    x = torch.randn(5, 6)
    with torch.no_grad():
        want = encoder(x)

    def refuse(path):
        raise AssertionError(f"torch.export.load of {path}")

    monkeypatch.setattr(programs, "load_graph", refuse)
    loaded = programs.load_program(directory, CPU, compiled=True)
    torch.testing.assert_close(loaded.program(x), want)
    assert loaded.weight_bytes == read_index(directory).weight_bytes
    with pytest.raises(EngineMismatchError, match="torch.export.load"):  # the op-by-op program needs the graph
        programs.load_program(directory, CPU, compiled=False)


def test_an_engine_without_the_index_loads_through_torch_export_load(built, tmp_path):
    import shutil

    directory, encoder = built
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    (old / PROGRAM_INDEX).unlink()
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = encoder(x)
    loaded = programs.load_program(old, CPU, compiled=True)
    torch.testing.assert_close(loaded.program(x), want)
    assert loaded.weight_bytes == read_index(directory).weight_bytes


def test_weights_that_do_not_fit_the_index_are_refused(built, tmp_path):
    import shutil

    from safetensors.torch import save_file

    directory, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    save_file(
        {"proj.weight": torch.randn(8, 7), "proj.bias": torch.randn(8), "scale": torch.randn(8)}, str(bad / WEIGHTS)
    )
    with pytest.raises(
        EngineMismatchError, match=r"weights.safetensors cannot be loaded .*proj.weight is torch.float32 \(8, 7\)"
    ):
        programs.load_program(bad, CPU, compiled=True)


def test_a_damaged_index_is_named_with_the_rebuild_advice(built, tmp_path):
    import shutil

    directory, _ = built
    bad = tmp_path / "bad-index"
    shutil.copytree(directory, bad)
    (bad / PROGRAM_INDEX).write_text("{not json")
    with pytest.raises(EngineMismatchError, match=rf"{PROGRAM_INDEX} cannot be loaded .*rebuild it with `kiln build`"):
        programs.load_program(bad, CPU, compiled=True)


_LOAD_COUNTING_PROBES = """
import sys, torch
from torch._inductor import cpu_vec_isa
probes = []
build = cpu_vec_isa.VecISA.check_build
def counted(self, code):  # the probe of the ISA itself, not of the extensions each ISA checks besides
    probes.extend([str(self)] if code == cpu_vec_isa.VecISA._avx_code else [])
    return build(self, code)
cpu_vec_isa.VecISA.check_build = counted
from kiln.engine.programs import load_program
program = load_program(__import__("pathlib").Path(sys.argv[1]), torch.device("cpu"), compiled=True).program
torch.manual_seed(0)
print(len(probes), program(torch.ones(4, 6)).sum().item())
"""


def _load_in_a_fresh_process(directory: Path) -> tuple[int, float]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_COUNTING_PROBES), str(directory)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    probes, total = done.stdout.split()[-2:]
    return int(probes), float(total)


def test_a_fresh_load_probes_the_cpu_isa_only_for_an_engine_from_another_isa(built, tmp_path):
    import shutil

    directory, encoder = built
    with torch.no_grad():
        want = encoder(torch.ones(4, 6)).sum().item()
    probes, total = _load_in_a_fresh_process(directory)
    assert probes == 0 and total == pytest.approx(want, rel=1e-5)
    foreign = tmp_path / "foreign"
    shutil.copytree(directory, foreign)
    index = json.loads((foreign / PROGRAM_INDEX).read_text())
    (foreign / PROGRAM_INDEX).write_text(json.dumps({**index, "vec_isa": "an isa of another cpu"}))
    facts = foreign / CPU_MODULE / FACTS  # the kernels kiln keeps beside the artifact: another CPU's too
    facts.write_text(json.dumps({**json.loads(facts.read_text()), "cpu_flags": ["a_flag_of_another_cpu"]}))
    probes, total = _load_in_a_fresh_process(foreign)
    assert probes > 0 and total == pytest.approx(want, rel=1e-5)
