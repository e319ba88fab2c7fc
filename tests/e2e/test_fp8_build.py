"""`kiln build --quantization fp8`: tiny Llama engines in FP8 (E4M3 weights and activations, emulated on the
CPU) generate exactly what transformers generates when its linears hold the same FP8 weights and round
their inputs to FP8 the same way (per token, or with the calibrated per-tensor scales)."""

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
from kiln.kernels.activation_quant import fake_quantize  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40


def _reference_tokens(checkpoint: Path, per_channel: bool, calibrated: bool) -> list[list[int]]:
    """transformers on the FP8 weights, each linear's input fake-quantized as the engine's op does."""
    model = load_reference(checkpoint)
    samples = None
    if calibrated:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        samples = calibration_ids(tokenizer, CALIBRATION, seq_len=512, max_sequences=1)
    quantized = fp8_linears(model, per_channel, samples)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            module = modules[name.removesuffix(".weight")]
            module.weight.copy_(weight.dequantize(torch.float32))

            def hook(_m, args, weight=weight):  # type: ignore[no-untyped-def]
                return (fake_quantize(args[0], weight.activations, torch.float8_e4m3fn, weight.input_scale),)

            module.register_forward_pre_hook(hook)
    return [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]


def _generate(engine: Path) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLM(engine).generate(PROMPTS, params)]


@pytest.mark.parametrize(
    ("weight_scales", "act_scales", "activations"),
    [("channel", "token", "fp8 dynamic per token"), ("tensor", "tensor", "fp8 static per tensor")],
)
def test_fp8_engine_matches_transformers_on_the_same_fp8_weights_and_inputs(
    checkpoints, tmp_path, weight_scales, act_scales, activations
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
    )
    block = read_manifest(engine).quantization
    assert block is not None
    assert (block.method, block.bits, block.weights, block.activations) == ("fp8", 8, "fp8", activations)
    assert len(block.layers) == 7 * 2
    stored = safe_open(str(engine / WEIGHTS), framework="pt")
    assert any(k.endswith(".qweight") and stored.get_tensor(k).dtype == torch.float8_e4m3fn for k in stored.keys())
    assert any(k.endswith(".input_scale") for k in stored.keys()) == (act_scales == "tensor")
    assert _generate(engine) == _reference_tokens(checkpoint, weight_scales == "channel", act_scales == "tensor")


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
