"""FP8 checkpoints build without --quantization: compressed-tensors FP8_DYNAMIC (per-token inputs)
engines generate what transformers generates on the weights the raw
tensors stand for (weight * weight_scale) with each linear's input rounded to FP8 the same way; a
block-wise FP8 engine (weight-only) generates what transformers generates on weight * weight_scale_inv."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from hf_reference import greedy, load_reference  # noqa: E402
from tiny_checkpoints import build_tiny_engine, make_checkpoint  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.engine.manifest import read_manifest  # noqa: E402
from kiln.kernels.activation_quant import FP8, fake_quantize  # noqa: E402
from kiln.models.quantized_formats import CheckpointQuantization  # noqa: E402
from tests.fp8_checkpoints import write_block_fp8, write_compressed_fp8  # noqa: E402

PROMPTS = [[5, 6, 7], list(range(10, 31))]
NEW_TOKENS = 10


def _generate(engine: Path) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in LLM(engine).generate(PROMPTS, params)]


def _compressed_reference(tmp_path: Path, checkpoint: Path, static: bool) -> list[list[int]]:
    model = load_reference(make_checkpoint("llama", tmp_path / "dense", seed=0))
    raw = load_file(str(checkpoint / "model.safetensors"))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in [n.removesuffix(".weight_scale") for n in raw if n.endswith(".weight_scale")]:
            module = modules[name]
            module.weight.copy_(raw[f"{name}.weight"].float() * raw[f"{name}.weight_scale"].float().reshape(-1, 1))
            scale = raw[f"{name}.input_scale"] if static else None

            def hook(_m, args, scale=scale):  # type: ignore[no-untyped-def]
                return (fake_quantize(args[0], "static" if static else "dynamic", FP8, scale),)

            module.register_forward_pre_hook(hook)
    return [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]


def test_compressed_tensors_fp8_dynamic_builds_as_it_is(tmp_path):
    checkpoint = tmp_path / "ckpt"
    write_compressed_fp8(checkpoint, "FP8_DYNAMIC")
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.bits, block.weights) == ("compressed-tensors", 8, "fp8")
    assert block.activations == "fp8 dynamic per token"
    assert _generate(engine) == _compressed_reference(tmp_path, checkpoint, static=False)


def test_compressed_tensors_fp8_static_reads_the_raw_tensors_bit_for_bit(tmp_path):
    """(Its engine runs the same ops as --quantization fp8 --act-scales tensor: test_fp8_build.)"""
    checkpoint = tmp_path / "ckpt"
    write_compressed_fp8(checkpoint, "FP8")
    raw = load_file(str(checkpoint / "model.safetensors"))
    quantized = CheckpointQuantization.of(checkpoint).read(torch.float32)
    assert quantized is not None and len(quantized.weights) == 7 * 2
    for name, weight in quantized.weights.items():
        n = weight.shape[0]
        assert torch.equal(weight.values.view(torch.uint8), raw[name].view(torch.uint8))
        assert torch.equal(weight.scales, raw[f"{name}_scale"].float().expand(n, 1))
        assert weight.activations == "static"
        assert torch.equal(weight.input_scale, raw[name.removesuffix("weight") + "input_scale"])


def _block_reference(tmp_path: Path, checkpoint: Path, block: tuple[int, int]) -> list[list[int]]:
    """transformers on W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk] (the format's meaning;
    transformers' own FP8 loader needs accelerate, which kiln does not install)."""
    model = load_reference(make_checkpoint("llama", tmp_path / "dense", seed=0))
    raw = load_file(str(checkpoint / "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in [n.removesuffix("_scale_inv") for n in raw if n.endswith(".weight_scale_inv")]:
            w = raw[name].float()
            inv = raw[f"{name}_scale_inv"].repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
            params[name].copy_(w * inv[: w.shape[0], : w.shape[1]])
    return [greedy(model, p, NEW_TOKENS)[0] for p in PROMPTS]


def test_block_fp8_builds_weight_only(tmp_path):
    checkpoint = tmp_path / "ckpt"
    write_block_fp8(checkpoint, (48, 32))  # 64 rows: a ragged last block of rows
    engine = build_tiny_engine(checkpoint, tmp_path / "engine")
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.group_size, block.activations) == ("fp8_block", 32, None)
    assert len(block.layers) == 7 * 2
    assert _generate(engine) == _block_reference(tmp_path, checkpoint, (48, 32))
