"""`kiln build --quantization int8_sq` (SmoothQuant W8A8 int8): smoothing leaves the full-precision model's
function unchanged, and the engine generates exactly what transformers generates on the smoothed model with
the same int8 weights and each linear's input rounded to int8 the same way (CPU emulation, float32)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import build_tiny_engine  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.compiler.quantize.calibration import calibration_ids  # noqa: E402
from kiln.compiler.quantize.smoothquant import smooth, smoothquant  # noqa: E402
from kiln.engine.manifest import read_manifest  # noqa: E402
from kiln.errors import KilnError  # noqa: E402
from tests.narrow_reference import use_quantized_linears  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10
CALIBRATION = "the quick brown fox jumps over the lazy dog. " * 40
ALPHA = 0.8


def _samples(checkpoint: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    return calibration_ids(AutoTokenizer.from_pretrained(checkpoint), CALIBRATION, seq_len=512, max_sequences=1)


def test_smoothing_keeps_the_full_precision_function(checkpoints):
    checkpoint = checkpoints("llama")
    model = load_reference(checkpoint)
    ids = torch.tensor([list(range(10, 40))])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        norm = model.model.layers[0].input_layernorm.weight.clone()
        smooth(model, _samples(checkpoint), ALPHA)
        after = model(input_ids=ids).logits
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_int8_sq_engine_matches_transformers_on_the_smoothed_int8_model(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION)
    engine = build_tiny_engine(
        checkpoint, tmp_path / "e", quantization="int8_sq", smoothquant_alpha=ALPHA, calib_data=str(calib), calib_size=1
    )
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.bits, block.activations) == (
        "int8_sq",
        8,
        "int8 dynamic per token",
    )
    assert len(block.layers) == 7 * 2
    model = load_reference(checkpoint)
    quantized = smoothquant(model, _samples(checkpoint), ALPHA, per_channel=True, per_token=True)
    use_quantized_linears(model, quantized)
    want = [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in LLM(engine).generate(PROMPTS, params)] == want


def test_int8_sq_needs_calibration_text(checkpoints, tmp_path):
    with pytest.raises(KilnError, match="give --calib-data"):
        build_tiny_engine(checkpoints("llama"), tmp_path / "e", quantization="int8_sq")
    assert not (tmp_path / "e").exists()
