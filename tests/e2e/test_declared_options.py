"""Declared options end to end: the manifest records the build choices, loading selects the kernels."""

from __future__ import annotations

import json
import shutil

from e2e_helpers import SHARED_GPU, kiln

from kiln.api import LLM
from kiln.engine.manifest import MANIFEST
from kiln.kernels.selection import KernelSelection, current

BUILD_CHOICES = ("fused_linears", "fuse_rope", "combo_kernels", "pdl")


def test_the_demo_manifest_records_the_build_choices(demo_engine):
    build = json.loads((demo_engine / MANIFEST).read_text())["build"]
    assert {name: build[name] for name in BUILD_CHOICES} == dict.fromkeys(BUILD_CHOICES, True)


def test_loading_selects_the_runtime_kernels_and_the_manifests_pdl(demo_engine, tmp_path):
    engine = tmp_path / "engine"
    shutil.copytree(demo_engine, engine)
    manifest = json.loads((engine / MANIFEST).read_text())
    manifest["build"]["pdl"] = False
    (engine / MANIFEST).write_text(json.dumps(manifest))
    before = current()
    llm = LLM(str(engine), attention_kernel="reference", argmax_kernel="reference", **SHARED_GPU)
    assert llm.engine.kernels == KernelSelection(attention="reference", linear="auto", argmax="reference", pdl=False)
    assert current() == before  # the engine selects its kernels around its own work only
    assert llm.generate([[5, 6, 7]])[0].token_ids
    del llm
    for name in BUILD_CHOICES:  # an engine built before the choices were declared
        del manifest["build"][name]
    (engine / MANIFEST).write_text(json.dumps(manifest))
    assert LLM(str(engine), **SHARED_GPU).engine.kernels == KernelSelection()


def test_the_cli_takes_the_kernel_choices(demo_engine):
    args = ("--attention-kernel", "reference", "--linear-kernel", "reference", "--argmax-kernel", "reference")
    proc = kiln("run", str(demo_engine), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json", *args)
    assert len(json.loads(proc.stdout)["outputs"][0]["token_ids"]) == 4
    bad = kiln("run", str(demo_engine), "--prompt-ids", "5", "--attention-kernel", "triton", check=False)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
