"""Operators outside torch's and kiln's namespaces: the build records the modules that register them,
and the loader imports those (or names the operator and module it could not import)."""

from __future__ import annotations

import dataclasses

import op_fixtures  # noqa: F401  (registers the kilntest operators)
import pytest
import torch
from manifests import manifest

from kiln.compiler.op_modules import op_modules
from kiln.compiler.pipeline import build_program
from kiln.compiler.program_spec import ProgramSpec
from kiln.config import BuildConfig
from kiln.engine.programs import import_op_modules, load_program
from kiln.errors import EngineMismatchError, UnsupportedModelError
from kiln.progress import Progress

CPU = torch.device("cpu")


class _Calls(torch.nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(torch.relu(x)) * 2


def _spec(op) -> ProgramSpec:
    rows = torch.export.Dim("rows", min=1, max=8)
    return ProgramSpec(
        module=_Calls(op),
        args=(torch.randn(2, 3),),
        dynamic_shapes=({0: rows},),
        what="a test",
        architecture="Test",
        directory="vision",
        passes=False,
    )


def _exported(op) -> torch.export.ExportedProgram:
    spec = _spec(op)
    return torch.export.export(spec.module, spec.args, dynamic_shapes=spec.dynamic_shapes)


def test_torch_and_kiln_operators_need_no_import():
    assert op_modules(_exported(torch.nn.functional.gelu)) == {}


@pytest.mark.parametrize(
    ("op", "name"),
    [
        (lambda x: torch.ops.kilntest.scaled(x, 3.0), "kilntest::scaled"),  # torch.library.custom_op
        (torch.ops.kilntest_lib.shifted, "kilntest_lib::shifted"),  # torch.library.Library
    ],
)
def test_a_third_party_operator_is_recorded_with_the_module_that_registers_it(op, name):
    assert op_modules(_exported(op)) == {name: ("op_fixtures",)}


def test_transformers_moe_operator_is_found():
    from transformers.integrations import moe

    def grouped(x: torch.Tensor) -> torch.Tensor:
        weight = torch.ones(2, 3, 3)
        return torch.ops.transformers.grouped_mm_fallback(x, weight, torch.tensor([1, x.shape[0]]))

    assert op_modules(_exported(grouped)) == {"transformers::grouped_mm_fallback": (moe.__name__,)}


def test_an_operator_of_the_running_script_is_refused():
    def body(x: torch.Tensor) -> torch.Tensor:
        return x - 1

    body.__module__ = "__main__"
    op = torch.library.custom_op("kilntest::from_script", body, mutates_args=())
    op.register_fake(lambda x: torch.empty_like(x))
    with pytest.raises(UnsupportedModelError, match=r"kilntest::from_script.*\(__main__\)"):
        op_modules(_exported(op))


def test_the_pipeline_returns_the_modules_and_the_loader_imports_them(tmp_path):
    written = build_program(_spec(torch.ops.kilntest_lib.shifted), tmp_path, BuildConfig(compile=False), Progress())
    assert written.op_modules == {"kilntest_lib::shifted": ("op_fixtures",)}
    x = torch.randn(4, 3)
    got = load_program(tmp_path / "vision", CPU, compiled=False, op_modules=written.op_modules).program(x)
    torch.testing.assert_close(got, (torch.relu(x) + 1) * 2)


def test_a_module_that_cannot_be_imported_is_named_with_its_operator():
    expected = r"transformers::gone.*kiln_no_such_module.*ModuleNotFoundError"
    with pytest.raises(EngineMismatchError, match=expected) as info:
        import_op_modules({"transformers::gone": ("kiln_no_such_module",)})
    assert "damaged" not in str(info.value)


def test_a_module_that_no_longer_registers_the_operator_is_named():
    with pytest.raises(EngineMismatchError, match=r"kilntest::renamed.*op_fixtures did not register it"):
        import_op_modules({"kilntest::renamed": ("op_fixtures",)})


def test_an_engine_without_recorded_modules_names_the_missing_operator(tmp_path):
    gone = torch.library.Library("kilntest_gone", "DEF")
    gone.define("halved(Tensor x) -> Tensor")
    gone.impl("halved", lambda x: x / 2, "CompositeExplicitAutograd")
    build_program(_spec(torch.ops.kilntest_gone.halved), tmp_path, BuildConfig(compile=False), Progress())
    gone._destroy()  # as in a new process that never imported the registering module
    expected = r"calls operators that no module imported here registers: kilntest_gone::halved"
    with pytest.raises(EngineMismatchError, match=expected) as info:
        load_program(tmp_path / "vision", CPU, compiled=False, op_modules={})
    assert "damaged" not in str(info.value)


def test_the_manifest_keeps_the_modules_and_reads_manifests_without_them(tmp_path):
    import json

    from kiln.engine.manifest import MANIFEST, read_manifest, write_manifest

    written = build_program(_spec(torch.ops.kilntest_lib.shifted), tmp_path, BuildConfig(compile=False), Progress())
    recorded = manifest(op_modules=written.op_modules)
    write_manifest(tmp_path, recorded)
    assert read_manifest(tmp_path) == recorded
    data = json.loads((tmp_path / MANIFEST).read_text())
    del data["op_modules"]  # a manifest from before the field
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    assert read_manifest(tmp_path) == dataclasses.replace(recorded, op_modules={})
