"""The build and runtime choices declared as config fields: validation and the manifest."""

import dataclasses
import json

import pytest
from manifests import manifest

from kiln.config import KERNEL_CHOICES, BuildConfig, RuntimeConfig
from kiln.engine import manifest as engine_dir
from kiln.errors import KilnError

BUILD_CHOICES = ("fused_linears", "fuse_rope", "combo_kernels", "pdl")
KERNEL_FIELDS = ("attention_kernel", "linear_kernel", "argmax_kernel")


def test_build_choices_default_to_the_fast_path():
    config = BuildConfig()
    assert all(getattr(config, name) is True for name in BUILD_CHOICES)


@pytest.mark.parametrize("name", BUILD_CHOICES)
def test_build_choices_take_booleans_only(name):
    assert getattr(BuildConfig(**{name: False}), name) is False
    for bad in (0, 1, "0", "false", None):
        with pytest.raises(KilnError, match=f"BuildConfig.{name} must be true or false"):
            BuildConfig(**{name: bad})


def test_unknown_fields_are_still_refused():
    with pytest.raises(KilnError, match="unknown field"):
        BuildConfig.from_dict({"fused_linear": False})
    with pytest.raises(KilnError, match="unknown field"):
        RuntimeConfig.from_dict({"attention": "reference"})


@pytest.mark.parametrize("name", KERNEL_FIELDS)
def test_runtime_kernel_choices_are_checked(name):
    assert getattr(RuntimeConfig(), name) == "auto"
    for choice in KERNEL_CHOICES:
        assert getattr(RuntimeConfig(**{name: choice}), name) == choice
    with pytest.raises(KilnError, match=f"RuntimeConfig.{name} must be one of"):
        RuntimeConfig(**{name: "triton"})


def test_runtime_booleans_are_checked():
    assert RuntimeConfig(overlap_decode=None).overlap_decode is None
    with pytest.raises(KilnError, match="RuntimeConfig.cuda_graphs must be true or false"):
        RuntimeConfig(cuda_graphs=0)  # type: ignore[arg-type]
    with pytest.raises(KilnError, match="RuntimeConfig.overlap_decode must be true or false"):
        RuntimeConfig(overlap_decode="yes")  # type: ignore[arg-type]


def test_build_choices_are_recorded_in_the_manifest(tmp_path):
    build = BuildConfig(fused_linears=False, fuse_rope=False, combo_kernels=False, pdl=False)
    engine_dir.write_manifest(tmp_path, manifest(build=build))
    recorded = json.loads((tmp_path / engine_dir.MANIFEST).read_text())["build"]
    assert {name: recorded[name] for name in BUILD_CHOICES} == dict.fromkeys(BUILD_CHOICES, False)
    assert engine_dir.read_manifest(tmp_path).build == build


def test_a_manifest_written_before_the_choices_loads_with_the_old_behaviour(tmp_path):
    engine_dir.write_manifest(tmp_path, manifest(build=BuildConfig(max_batch_size=4)))
    path = tmp_path / engine_dir.MANIFEST
    data = json.loads(path.read_text())
    for name in BUILD_CHOICES:
        del data["build"][name]
    path.write_text(json.dumps(data))
    build = engine_dir.read_manifest(tmp_path).build
    assert build == BuildConfig(max_batch_size=4)
    assert dataclasses.asdict(build)["pdl"] and build.fused_linears and build.fuse_rope and build.combo_kernels
