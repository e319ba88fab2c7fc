"""`kiln build --quantization fp8`: tiny Llama engines in FP8 (E4M3 weights and activations, emulated on the
CPU) generate exactly what transformers generates when its linears hold the same FP8 weights and round
their inputs to FP8 the same way (per token, or with the calibrated per-tensor scales); with an fp8 KV
cache (scale 1.0 without calibration text), when its attention reads keys and values rounded alike."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import build_tiny_engine  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.compiler.quantize.calibration import calibration_ids  # noqa: E402
from kiln.compiler.quantize.fp8 import fp8_linears  # noqa: E402
from kiln.engine.manifest import WEIGHTS, read_manifest  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from tests.narrow_reference import use_narrow_kv, use_quantized_linears  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40


def _reference_tokens(
    checkpoint: Path, per_channel: bool, calibrated: bool, kv_scales: tuple[tuple[float, float], ...] | None
) -> list[list[int]]:
    """transformers on the FP8 weights, each linear's input fake-quantized as the engine's op does (and
    keys/values rounded as an fp8 KV cache holds them)."""
    model = load_reference(checkpoint)
    samples = None
    if calibrated:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        samples = calibration_ids(tokenizer, CALIBRATION, seq_len=512, max_sequences=1)
    use_quantized_linears(model, fp8_linears(model, per_channel, samples))
    if kv_scales is not None:
        use_narrow_kv(model, "fp8", kv_scales)
    return [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]


def _generate(engine: Path) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLM(engine).generate(PROMPTS, params)]


@pytest.mark.parametrize(
    ("weight_scales", "act_scales", "kv_cache_dtype", "activations"),
    [("channel", "token", "fp8", "fp8 dynamic per token"), ("tensor", "tensor", "auto", "fp8 static per tensor")],
)
def test_fp8_engine_matches_transformers_on_the_same_fp8_weights_and_inputs(
    checkpoints, tmp_path, weight_scales, act_scales, kv_cache_dtype, activations
):
    checkpoint = checkpoints("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    engine = build_tiny_engine(
        checkpoint,
        tmp_path / "e",
        quantization="fp8",
        weight_scales=weight_scales,
        act_scales=act_scales,
        calib_data=str(calib) if act_scales == "tensor" else None,
        calib_size=1,
        kv_cache_dtype=kv_cache_dtype,
    )
    manifest = read_manifest(engine)
    block = manifest.quantization
    assert block is not None
    assert (block.method, block.bits, block.weights, block.activations) == ("fp8", 8, "fp8", activations)
    assert len(block.layers) == 7 * 2
    stored = safe_open(str(engine / WEIGHTS), framework="pt")
    assert any(k.endswith(".qweight") and stored.get_tensor(k).dtype == torch.float8_e4m3fn for k in stored.keys())
    assert any(k.endswith(".input_scale") for k in stored.keys()) == (act_scales == "tensor")
    kv = manifest.kv_cache  # fp8 KV without calibration text: scale 1.0, recorded as uncalibrated
    assert (kv is None) == (kv_cache_dtype == "auto")
    assert kv is None or (kv.dtype, kv.calibrated, kv.scales) == ("fp8", False, ((1.0, 1.0), (1.0, 1.0)))
    kv_scales = None if kv is None else kv.scales
    want = _reference_tokens(checkpoint, weight_scales == "channel", act_scales == "tensor", kv_scales)
    assert _generate(engine) == want


def test_fp8_calibration_errors_leave_nothing_written(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    with pytest.raises(KilnError, match="give --calib-data"):
        build_tiny_engine(checkpoint, tmp_path / "a", quantization="fp8", act_scales="tensor")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(KilnError, match="fewer than --calib-size 4"):
        build_tiny_engine(
            checkpoint, tmp_path / "b", quantization="fp8", act_scales="tensor", calib_data=str(short), calib_size=4
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
