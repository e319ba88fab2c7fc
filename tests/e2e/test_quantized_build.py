"""`kiln build --quantization`: tiny Llama engines quantized at build generate exactly what transformers
generates on the model whose linears hold the dequantized round-to-nearest weights (float32, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import build_tiny_engine  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.compiler.quantize.rtn import quantize  # noqa: E402
from kiln.engine.manifest import WEIGHTS, read_manifest  # noqa: E402
from kiln.errors import KilnError  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31)), list(range(50, 63))]
NEW_TOKENS = 12
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _reference_tokens(checkpoint: Path, bits: int, group_size: int) -> list[list[int]]:
    model = load_reference(checkpoint)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                module.weight.copy_(quantize(module.weight, bits, group_size).dequantize(torch.float32))
    return [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]


def _generate(engine: Path) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLM(engine).generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def int8_engine(checkpoints, tmp_path_factory):
    return build_tiny_engine(checkpoints("llama"), tmp_path_factory.mktemp("int8") / "e", quantization="int8_wo")


def _engine(checkpoints, tmp_path, int8_engine, method, compile):
    if (method, compile) == ("int8_wo", False):
        return int8_engine
    return build_tiny_engine(checkpoints("llama"), tmp_path / "e", quantization=method, group_size=32, compile=compile)


@pytest.mark.parametrize(
    ("method", "bits", "compile"), [("int8_wo", 8, False), ("int4_wo", 4, False), ("int4_wo", 4, True)]
)
def test_quantized_engine_matches_transformers_on_the_dequantized_weights(
    checkpoints, tmp_path, int8_engine, method, bits, compile
):
    checkpoint = checkpoints("llama")
    engine = _engine(checkpoints, tmp_path, int8_engine, method, compile)
    assert _generate(engine) == _reference_tokens(checkpoint, bits, 32)
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.bits, block.lm_head) == (method, bits, False)
    assert block.group_size == (32 if bits == 4 else None)
    assert len(block.layers) == 7 * 2 and all(name.split(".")[-2] in PROJECTIONS for name in block.layers)
    raw = json.loads((engine / "manifest.json").read_text())
    assert raw["quantization"]["layers"] == list(block.layers) and raw["build"]["quantization"] == method
    from safetensors import safe_open

    with safe_open(str(engine / WEIGHTS), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".qweight")}
    assert dtypes == {"I8" if bits == 8 else "U8"}


def test_a_quantized_engine_reads_fewer_weight_bytes_per_step(checkpoints, tmp_path, int8_engine):
    dense = LLM(build_tiny_engine(checkpoints("llama"), tmp_path / "dense")).engine.weight_bytes
    int8 = LLM(int8_engine).engine.weight_bytes
    # per layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128 -- float32 before, int8 + a float32
    # scale per row after
    projections = 2 * (64 * (64 + 32 + 32 + 64) + 3 * 64 * 128)
    scales = 2 * (64 + 32 + 32 + 64 + 128 * 2 + 64) * 4
    assert dense - int8 == projections * 4 - projections - scales


def test_quantization_errors_are_clear_and_leave_nothing_behind(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    out = tmp_path / "e"
    with pytest.raises(KilnError, match=r"q_proj_k_proj_v_proj.weight to int4 in groups of 128.*in_features 64"):
        build_tiny_engine(checkpoint, out, quantization="int4_wo", group_size=128)
    assert list(tmp_path.iterdir()) == []  # neither the engine nor its staging directory
    with pytest.raises(KilnError, match="kiln does not run GPTQ itself"):
        build_tiny_engine(checkpoint, out, quantization="int4_gptq")
    with pytest.raises(KilnError, match="give --quantization too"):
        build_tiny_engine(checkpoint, out, quantize_lm_head=True)
    calibration = tmp_path.parent / f"{tmp_path.name}-calib.txt"
    calibration.write_text("the kiln fires clay " * 200)
    with pytest.raises(KilnError, match="no such file"):
        build_tiny_engine(checkpoint, out, quantization="int4_awq", calib_data=str(tmp_path / "missing.txt"))
    assert list(tmp_path.iterdir()) == []


def test_an_awq_engine_matches_transformers_on_the_awq_weights(checkpoints, tmp_path):
    """int4_awq: the engine generates what transformers does on the model AWQ left (scales folded into
    the norms, every projection holding its dequantized int4 weight), searched on the same text."""
    from tiny_checkpoints import make_tokenizer

    from kiln.compiler.quantize.awq import awq_quantize
    from kiln.compiler.quantize.methods import calibration_ids

    checkpoint = checkpoints("llama")
    calibration = tmp_path / "calib.txt"
    calibration.write_text("the kiln fires clay and glaze at night, slowly " * 60)
    engine = build_tiny_engine(
        checkpoint, tmp_path / "e", quantization="int4_awq", group_size=32, calib_data=str(calibration), calib_size=4
    )
    model = load_reference(checkpoint)
    with torch.no_grad():
        awq_quantize(model, calibration_ids(make_tokenizer(), str(calibration), 4), 32)
    assert _generate(engine) == [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.bits, block.group_size) == ("int4_awq", 4, 32)
