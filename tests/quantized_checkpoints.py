"""Tiny pre-quantized checkpoints (a tiny Llama by default) in AWQ, GPTQ and compressed-tensors formats.

AWQ and GPTQ are packed here from each format's published layout, from random integer values, zero
points and scales that the writers return (`Quantized`), so tests know what every file stands for.
compressed-tensors writes its own checkpoint with the library's quantization and compressor.
A `Tiny` names the dense checkpoint to start from and which of its linears are quantized.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tests.tiny_checkpoints import make_checkpoint

LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column of its block of 8 that field i of an int32 holds


@dataclass(frozen=True)
class Tiny:
    """A dense tiny checkpoint to quantize: how to write it, the checkpoint weights AWQ/GPTQ quantize, the
    transformers class compressed-tensors loads it with, and the modules compressed-tensors leaves dense."""

    make: Callable[[Path, int], Any]  # (directory, seed)
    linears: re.Pattern[str]
    model_class: str
    ignore: tuple[str, ...]


LLAMA = Tiny(lambda d, seed: make_checkpoint("llama", d, seed=seed), LINEAR, "AutoModelForCausalLM", ("lm_head",))


@dataclass(frozen=True)
class Quantized:
    """One linear as its writer quantized it, in the format's own [K, N] orientation."""

    q: torch.Tensor  # int64 [K, N], 0 .. 2**bits - 1
    zeros: torch.Tensor  # int64 [G, N], the true zero points
    scales: torch.Tensor  # fp16 [G, N]
    g_idx: torch.Tensor  # int64 [K]: the group of each input row

    def dense(self) -> torch.Tensor:
        """W [N, K] = (q - z[g_idx]) * s[g_idx], in float32."""
        z, s = self.zeros[self.g_idx].float(), self.scales[self.g_idx].float()
        return ((self.q.float() - z) * s).T.contiguous()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _random_linear(k: int, n: int, bits: int, group: int, sym: bool, desc_act: bool, min_zero: int) -> Quantized:
    top = 2**bits
    groups = k // group
    if desc_act:  # GPTQ quantizes rows in a permuted order and records each row's group
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[torch.randperm(k)] = torch.arange(k) // group
    else:
        g_idx = torch.arange(k) // group
    zeros = torch.full((groups, n), top // 2) if sym else torch.randint(min_zero, top, (groups, n))
    scales = (torch.rand(groups, n) * 0.02 + 0.001).to(torch.float16)
    return Quantized(torch.randint(0, top, (k, n)), zeros, scales, g_idx)


def _rewrite(
    directory: Path,
    qc: dict[str, Any],
    pack: Any,
    linears: re.Pattern[str],
    overrides: Callable[[str], dict[str, Any] | None] = lambda module: {},
    **spec: Any,
) -> dict[str, Quantized]:
    """`overrides(module)`: that module's changes to `spec` (bits, group_size), or None to leave it dense."""
    state = load_file(str(directory / "model.safetensors"))
    written: dict[str, Quantized] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        module = name.removesuffix(".weight")
        changes = overrides(module) if linears.fullmatch(name) else None
        if changes is None:
            out[name] = tensor
            continue
        own = {**spec, **changes}
        n, k = tensor.shape
        group = k if own["group_size"] == -1 else own["group_size"]
        linear = _random_linear(k, n, own["bits"], group, own["sym"], own["desc_act"], own["min_zero"])
        out.update({f"{module}.{key}": value for key, value in pack(linear, own["bits"]).items()})
        written[name] = linear
    (directory / "model.safetensors").unlink()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return written


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[R, C] of 0..15 -> int32 [R, C / 8]: field i of word c holds column 8c + AWQ_ORDER[i]."""
    words = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for c in range(words.shape[1]):
        for i, col in enumerate(AWQ_ORDER):
            words[:, c] |= values[:, 8 * c + col] << (4 * i)
    return _as_int32(words)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight: [K, N] -> int32 [K * bits / 32, N]; field i of row r holds input row r * (32 / bits) + i."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for i in range(per):
            words[r] |= values[r * per + i] << (bits * i)
    return _as_int32(words)


def write_awq(directory: Path, group_size: int = 32, seed: int = 0, tiny: Tiny = LLAMA) -> dict[str, Quantized]:
    tiny.make(directory, seed)
    torch.manual_seed(seed + 1)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}

    def pack(lin: Quantized, bits: int) -> dict[str, torch.Tensor]:
        return {"qweight": _pack_awq(lin.q), "qzeros": _pack_awq(lin.zeros), "scales": lin.scales}

    spec = dict(bits=4, group_size=group_size, sym=False, desc_act=False, min_zero=0)
    return _rewrite(directory, qc, pack, tiny.linears, **spec)


def write_gptq(
    directory: Path,
    bits: int = 4,
    group_size: int = 32,
    sym: bool = False,
    desc_act: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
    tiny: Tiny = LLAMA,
    dynamic: dict[str, dict[str, Any]] | None = None,
    overrides: Callable[[str], dict[str, Any] | None] = lambda module: {},
) -> dict[str, Quantized]:
    """`checkpoint_format` "gptq" (v1) stores zero - 1 (its zero points are then 1 or more), "gptq_v2" the zero.
    `dynamic` goes into the config as GPTQModel writes it; `overrides` is what the test means it to say per module
    (see `_rewrite`), written out by hand so the reader's rule matching is checked against it."""
    tiny.make(directory, seed)
    torch.manual_seed(seed + 1)
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
    }
    if dynamic is not None:
        qc["dynamic"] = dynamic
    offset = 1 if checkpoint_format == "gptq" else 0

    def pack(lin: Quantized, bits: int) -> dict[str, torch.Tensor]:
        qzeros = _pack_rows((lin.zeros - offset).T.contiguous(), bits).T.contiguous()
        return {
            "qweight": _pack_rows(lin.q, bits),
            "qzeros": qzeros,
            "scales": lin.scales,
            "g_idx": lin.g_idx.to(torch.int32),
        }

    spec = dict(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, min_zero=offset)
    return _rewrite(directory, qc, pack, tiny.linears, overrides, **spec)


def write_compressed_tensors(
    directory: Path, scheme: str = "W4A16", group_size: int = 32, seed: int = 0, tiny: Tiny = LLAMA
) -> None:
    """A tiny checkpoint quantized and packed by compressed-tensors itself (`scheme`: a preset name such as
    W4A16, W4A16_ASYM, W8A16), with min/max scales per group of `group_size` (-1: per output channel); every
    Linear but those `tiny.ignore` names."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    tiny.make(directory, seed)
    model = getattr(transformers, tiny.model_class).from_pretrained(directory).eval()
    base: QuantizationScheme = preset_name_to_scheme(scheme, ["Linear"])
    weights = base.weights
    assert weights is not None
    if group_size == -1:
        weights = weights.model_copy(update={"strategy": "channel", "group_size": None})
    else:
        weights = weights.model_copy(update={"strategy": "group", "group_size": group_size})
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=list(tiny.ignore)
    )
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            g = w.shape[1] if weights.strategy == "channel" else group_size
            grouped = w.reshape(w.shape[0], -1, g)
            scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    (directory / "model.safetensors").unlink()
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
