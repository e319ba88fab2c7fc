"""Checkpoints kiln must refuse, each with a message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from kiln import KilnError, UnsupportedModelError, build


def test_unsupported_architecture_is_named(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        build(ckpt, tmp_path / "engine", progress=False, compile=False)


def test_pickled_weights_are_refused(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(KilnError, match="only from safetensors"):
        build(ckpt, tmp_path / "engine", progress=False, compile=False)


def test_remote_code_needs_permission(checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints("llama"), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config["architectures"] = ["EvilForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "modeling_evil.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(UnsupportedModelError):
        build(ckpt, tmp_path / "engine", progress=False, compile=False)


def test_unknown_build_option_is_rejected(checkpoints, tmp_path):
    with pytest.raises(KilnError, match="fp16"):
        build(checkpoints("llama"), tmp_path / "engine", progress=False, fp16=True)


def test_limits_beyond_the_model_are_rejected(checkpoints, tmp_path):
    with pytest.raises(KilnError, match="max_position_embeddings"):
        build(checkpoints("llama"), tmp_path / "engine", progress=False, compile=False, max_seq_len=4096)


def test_does_not_overwrite_a_non_engine_directory(checkpoints, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(KilnError, match="refusing to overwrite"):
        build(checkpoints("llama"), precious, progress=False, compile=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_attention_computed_outside_the_interface_is_refused(checkpoints, tmp_path):
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM computes attention in its own code"):
        build(checkpoints("bloom"), tmp_path / "engine", progress=False, compile=False)


def test_failed_rebuild_keeps_the_existing_engine(checkpoints, tmp_path):
    engine = tmp_path / "engine"
    build(checkpoints("llama"), engine, progress=False, compile=False, max_seq_len=64)
    before = {p.name: p.stat().st_size for p in engine.iterdir()}
    with pytest.raises(UnsupportedModelError):
        build(checkpoints("bloom"), engine, progress=False, compile=False)
    assert {p.name: p.stat().st_size for p in engine.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no staging directory left behind
