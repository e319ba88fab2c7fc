"""The manifest's quantization block, and what a build accepts with a pre-quantized checkpoint."""

import json

import pytest
import torch
from manifests import manifest

from kiln.compiler.quantize.methods import calibration_ids, check_request, engine_quantization
from kiln.compiler.quantize.rtn import quantize_int4
from kiln.config import QUANTIZATION_METHODS, BuildConfig
from kiln.engine import manifest as engine_dir
from kiln.engine.manifest import QuantizationFacts
from kiln.errors import EngineMismatchError, KilnError
from kiln.models.quantized_checkpoint import QuantizedLinears

LAYERS = ("model.model.layers.0.self_attn.q_proj.weight", "model.model.layers.0.mlp.down_proj.weight")


def _gptq(bits: int = 4) -> QuantizedLinears:
    return QuantizedLinears(
        "gptq", bits, 32, {"model.layers.0.mlp.down_proj.weight": quantize_int4(torch.randn(4, 64), 32)}
    )


def test_the_block_round_trips_and_old_manifests_have_none(tmp_path):
    block = QuantizationFacts(method="int4_wo", bits=4, group_size=128, layers=LAYERS, lm_head=False)
    m = manifest(quantization=block, build=BuildConfig(quantization="int4_wo"))
    engine_dir.write_manifest(tmp_path, m)
    assert engine_dir.read_manifest(tmp_path) == m
    data = json.loads((tmp_path / engine_dir.MANIFEST).read_text())
    assert data["quantization"] == {
        "method": "int4_wo",
        "bits": 4,
        "group_size": 128,
        "layers": list(LAYERS),
        "lm_head": False,
    }
    del data["quantization"]  # an engine built before kiln quantized
    for name in ("quantization", "group_size", "quantize_lm_head", "calib_data", "calib_size"):
        del data["build"][name]
    (tmp_path / engine_dir.MANIFEST).write_text(json.dumps(data))
    old = engine_dir.read_manifest(tmp_path)
    assert old.quantization is None and old.build.quantization == "none"


def test_an_unsupported_method_is_named_with_the_supported_ones(tmp_path):
    with pytest.raises(KilnError, match="unsupported quantization method 'bitsandbytes'; kiln supports int8_wo"):
        QuantizationFacts(method="bitsandbytes", bits=4, group_size=64, layers=(), lm_head=False)
    data = json.loads(manifest().to_json())
    data["quantization"] = {"method": "exl2", "bits": 4, "group_size": 64, "layers": [], "lm_head": False}
    (tmp_path / engine_dir.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EngineMismatchError, match="'exl2'; kiln supports " + ", ".join(QUANTIZATION_METHODS)):
        engine_dir.read_manifest(tmp_path)


def test_a_pre_quantized_checkpoint_takes_no_other_quantization():
    check_request(BuildConfig(), _gptq(), "ckpt")
    check_request(BuildConfig(quantization="int4_gptq"), _gptq(), "ckpt")  # the same thing, said twice
    for other in ("int8_wo", "int4_wo", "int4_awq"):
        with pytest.raises(KilnError, match=r"ckpt is already quantized \(gptq, 4 bits\); build it without"):
            check_request(BuildConfig(quantization=other), _gptq(), "ckpt")
    with pytest.raises(KilnError, match="already quantized"):
        check_request(BuildConfig(quantization="int4_gptq"), _gptq(bits=8), "ckpt")
    with pytest.raises(KilnError, match="unsupported quantization method"):
        check_request(BuildConfig(), QuantizedLinears("bitsandbytes", 4, 64, {}), "ckpt")


def test_awq_needs_calibration_text_and_gptq_a_gptq_checkpoint(tmp_path):
    with pytest.raises(KilnError, match="give --calib-data FILE"):
        check_request(BuildConfig(quantization="int4_awq"), None, "ckpt")
    with pytest.raises(KilnError, match="no such file"):
        check_request(BuildConfig(quantization="int4_awq", calib_data=str(tmp_path / "notes.txt")), None, "ckpt")
    (tmp_path / "notes.txt").write_text("clay")
    check_request(BuildConfig(quantization="int4_awq", calib_data=str(tmp_path / "notes.txt")), None, "ckpt")
    with pytest.raises(KilnError, match="kiln does not run GPTQ itself"):
        check_request(BuildConfig(quantization="int4_gptq"), None, "ckpt")
    with pytest.raises(KilnError, match="give --quantization too"):
        check_request(BuildConfig(quantize_lm_head=True), None, "ckpt")


def test_the_block_records_the_checkpoint_s_method_or_the_build_s():
    block = engine_quantization(BuildConfig(), _gptq(), LAYERS)
    assert block is not None and (block.method, block.bits, block.group_size) == ("gptq", 4, 32)
    block = engine_quantization(BuildConfig(quantization="int8_wo", quantize_lm_head=True), None, LAYERS)
    assert block is not None and (block.method, block.bits, block.group_size, block.lm_head) == (
        "int8_wo",
        8,
        None,
        True,
    )
    assert engine_quantization(BuildConfig(), None, ()) is None
    with pytest.raises(KilnError, match="found no linear to quantize"):
        engine_quantization(BuildConfig(quantization="int4_wo"), None, ())


def test_calibration_text_is_cut_into_rows(tmp_path):
    from tiny_checkpoints import make_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text("the kiln fires clay and glaze " * 400)
    ids = calibration_ids(make_tokenizer(), str(text), 3)
    assert 1 <= len(ids) <= 3 and all(t.dtype == torch.int64 and t.numel() == 512 for t in ids[:-1])
    with pytest.raises(KilnError, match="--calib-data FILE"):
        calibration_ids(make_tokenizer(), None, 3)
    with pytest.raises(KilnError, match="cannot read the calibration text"):
        calibration_ids(make_tokenizer(), str(tmp_path / "missing.txt"), 3)
