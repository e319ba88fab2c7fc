"""Tiny FP8 checkpoints (a tiny Llama): compressed-tensors FP8 / FP8_DYNAMIC written by the library's own
compressor, and block-wise FP8 (`weight_scale_inv`) written here from the format's published layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.quantized_checkpoints import LINEAR
from tests.tiny_checkpoints import make_checkpoint

FP8_MAX = 448.0
INPUT_SCALE = 0.02  # the static input scale every linear of an FP8 (static) checkpoint gets


def write_compressed_fp8(directory: Path, scheme: str = "FP8_DYNAMIC", seed: int = 0) -> None:
    """A tiny Llama with every linear but lm_head in compressed-tensors `scheme` (FP8: per-tensor weights
    and static inputs; FP8_DYNAMIC: per-channel weights and per-token inputs), scales absmax / 448."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    make_checkpoint("llama", directory, seed=seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    group = preset_name_to_scheme(scheme, ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                w = module.weight.detach().abs()
                amax = w.amax(dim=1, keepdim=True) if module.weight_scale.numel() > 1 else w.amax().reshape(1)
                module.weight_scale.copy_((amax / FP8_MAX).reshape(module.weight_scale.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(INPUT_SCALE)
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory)
    compressor.update_config(str(directory))


def write_block_fp8(directory: Path, block: tuple[int, int] = (32, 32), seed: int = 0) -> None:
    """A tiny Llama whose q/k/v/o and MLP projections are block-wise FP8: weight float8_e4m3fn [N, K] and
    weight_scale_inv [ceil(N / bn), ceil(K / bk)] = absmax of the block / 448."""
    make_checkpoint("llama", directory, seed=seed)
    tensors = load_file(str(directory / "model.safetensors"))
    bn, bk = block
    for name in [n for n in tensors if LINEAR.fullmatch(n)]:
        w = tensors[name].float()
        n, k = w.shape
        rows, cols = -(-n // bn), -(-k // bk)
        padded = torch.zeros(rows * bn, cols * bk)
        padded[:n, :k] = w
        amax = padded.reshape(rows, bn, cols, bk).abs().amax(dim=(1, 3))
        inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scaled = w / inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        tensors[name] = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = inv
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
