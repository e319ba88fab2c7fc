import json

import pytest
import torch
from manifests import manifest

from kiln.config import BuildConfig
from kiln.engine import manifest as engine_dir
from kiln.engine.manifest import EngineMismatchError, check_compatible
from kiln.errors import KilnError


def test_round_trip(tmp_path):
    m = manifest()
    engine_dir.write_manifest(tmp_path, m)
    assert engine_dir.read_manifest(tmp_path) == m


def test_the_passes_that_changed_the_graph_round_trip_and_old_manifests_have_none(tmp_path):
    m = manifest(passes={"paged_attention": "4 sites", "gather_before_norm": "1 site"})
    engine_dir.write_manifest(tmp_path, m)
    assert engine_dir.read_manifest(tmp_path).passes == {"paged_attention": "4 sites", "gather_before_norm": "1 site"}
    old = json.loads(m.to_json())
    del old["passes"]  # written before kiln recorded the passes
    (tmp_path / engine_dir.MANIFEST).write_text(json.dumps(old))
    assert engine_dir.read_manifest(tmp_path).passes == {}


def test_matching_cpu_engine_loads_on_cpu():
    assert check_compatible(manifest()) == torch.device("cpu")


def test_every_mismatch_is_listed_with_rebuild_advice():
    m = manifest(kiln_version="0.0.1", torch_version="2.0.0")
    with pytest.raises(EngineMismatchError) as err:
        check_compatible(m)
    text = str(err.value)
    assert "kiln 0.0.1" in text and "torch 2.0.0" in text and "Rebuild" in text


def test_other_gpu_architecture_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        engine_dir, "describe_device", lambda device: {"type": "cuda", "name": "NVIDIA A100", "capability": "8.0"}
    )
    m = manifest(device={"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"})
    with pytest.raises(EngineMismatchError, match="compute capability 9.0 .*this GPU is 8.0"):
        check_compatible(m)


def test_unreadable_manifest_says_rebuild(tmp_path):
    (tmp_path / engine_dir.MANIFEST).write_text('{"kiln_version": "0.1.0"}')
    with pytest.raises(EngineMismatchError, match="rebuild"):
        engine_dir.read_manifest(tmp_path)


def test_build_config_rejects_unknown_and_inconsistent_fields():
    with pytest.raises(KilnError, match="fp16"):
        BuildConfig.from_dict({"fp16": True})
    with pytest.raises(KilnError, match="max_input_len"):
        BuildConfig(max_input_len=4096, max_seq_len=2048)
    with pytest.raises(KilnError, match="power of two"):
        BuildConfig(tokens_per_block=12)


def test_unset_limits_come_from_the_model():
    assert BuildConfig().resolved(512).max_seq_len == 512
    assert BuildConfig().resolved(512).max_input_len == 512
    assert BuildConfig().resolved(131072).max_seq_len == 2048
    assert BuildConfig().resolved(131072).max_input_len == 1024
    assert BuildConfig().resolved(None).max_seq_len == 2048
    explicit = BuildConfig(max_seq_len=300, max_input_len=100).resolved(512)
    assert (explicit.max_seq_len, explicit.max_input_len) == (300, 100)
    with pytest.raises(KilnError, match="max_position_embeddings"):
        BuildConfig(max_seq_len=1024).resolved(512)
    with pytest.raises(KilnError, match="not resolved"):
        _ = BuildConfig().seq_len
