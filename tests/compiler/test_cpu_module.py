"""A CPU program's output code and kernels, written by the build as cpu_module/, load without
torch._inductor (hence without torch._dynamo) and give the artifact's outputs bit for bit; an engine
whose cpu_module/ is missing, foreign or damaged loads through its artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kiln.compiler.cpu_module import Unsupported, rewrite
from kiln.compiler.pipeline import build_program
from kiln.compiler.program_spec import ProgramSpec
from kiln.config import BuildConfig
from kiln.engine.cpu_module import CPU_MODULE, FACTS, KERNELS, SOURCE, ModuleFacts, cpu_flags
from kiln.progress import Progress

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not cpu_flags(), reason="needs /proc/cpuinfo")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(6, 16)
        self.down = torch.nn.Linear(16, 6)
        self.register_buffer("scale", torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x))) * self.scale + x


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    block = _Block().eval()
    spec = ProgramSpec(
        module=block,
        args=(torch.randn(3, 6),),
        dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=64)},),
        what="a test program",
        architecture="Test",
        directory="vision",
        passes=False,
    )
    root = tmp_path_factory.mktemp("cpu-module")
    build_program(spec, root, BuildConfig(compile=True), Progress(enabled=False))
    return root / "vision", block


_LOAD = """
import sys, torch
from kiln.engine.programs import load_program
program = load_program(__import__("pathlib").Path(sys.argv[1]), torch.device("cpu"), compiled=True).program
x = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6) / 10
out = program(x)
print(type(program).__name__, "torch._inductor" in sys.modules, "torch._dynamo" in sys.modules)
print(repr(out.flatten().tolist()))
"""


def _fresh_load(directory: Path) -> tuple[str, bool, bool, list[float]]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD), str(directory)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    kind, inductor, dynamo = done.stdout.splitlines()[-2].split()
    return kind, inductor == "True", dynamo == "True", eval(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fresh(built) -> tuple[str, bool, bool, list[float]]:
    """What a fresh process loads from the built program and computes with it (the tests below compare to it)."""
    return _fresh_load(built[0])


def test_the_build_writes_the_output_code_with_its_kernel_libraries(built):
    directory, _ = built
    facts = ModuleFacts.from_json((directory / CPU_MODULE / FACTS).read_text())
    assert facts.usable() and facts.torch == torch.__version__ and facts.cpu_flags == cpu_flags()
    assert facts.kernels and sorted(p.stem for p in (directory / CPU_MODULE / KERNELS).iterdir()) == sorted(
        facts.kernels
    )
    source = (directory / CPU_MODULE / SOURCE).read_text()
    assert "from kiln.engine.cpu_runtime import" in source and "cpp_pybinding" not in source


def test_a_fresh_load_skips_torch_inductor_and_matches_the_artifact_bit_for_bit(built, fresh, tmp_path):
    directory, block = built
    kind, inductor, dynamo, got = fresh
    assert (kind, inductor, dynamo) == ("ModuleProgram", False, False)
    without = tmp_path / "without"
    shutil.copytree(directory, without)
    shutil.rmtree(without / CPU_MODULE)  # an engine built before cpu_module/ existed
    kind, inductor, _, want = _fresh_load(without)
    assert (kind, inductor) == ("CompiledProgram", True)
    assert got == want
    x = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6) / 10
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(got), block(x).flatten())


@pytest.mark.parametrize("change", ["cpu_flags", "torch", "damaged"])
def test_a_foreign_or_damaged_module_falls_back_to_the_artifact(built, fresh, tmp_path, change):
    directory, _ = built
    want = fresh[3]
    other = tmp_path / change
    shutil.copytree(directory, other)
    facts = other / CPU_MODULE / FACTS
    data = json.loads(facts.read_text())
    if change == "cpu_flags":
        facts.write_text(json.dumps({**data, "cpu_flags": [*data["cpu_flags"], "a_flag_this_cpu_lacks"]}))
    elif change == "torch":
        facts.write_text(json.dumps({**data, "torch": "0.0.1"}))
    else:
        (other / CPU_MODULE / KERNELS / f"{data['kernels'][0]}.so").write_bytes(b"not a library")
    kind, inductor, _, got = _fresh_load(other)
    assert (kind, inductor) == ("CompiledProgram", True)
    assert got == want


def test_the_rewrite_refuses_what_it_does_not_know():
    known = "from torch._inductor.select_algorithm import extern_kernels\nx = 1\n"
    assert rewrite(known)[0].startswith("from kiln.engine.cpu_runtime import extern_kernels as extern_kernels")
    with pytest.raises(Unsupported, match="import of something"):
        rewrite("from torch._inductor.utils import something\n")
    with pytest.raises(Unsupported, match="kernel kind async_compile.triton"):
        rewrite("k = async_compile.triton('k', '''src''')\n")
    with pytest.raises(Unsupported, match="torch internals"):
        rewrite("def call(args):\n    return torch._inductor.config\n")
