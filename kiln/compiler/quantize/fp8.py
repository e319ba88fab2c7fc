"""FP8 (E4M3) at build: weights per output channel or per tensor, activations per token or calibrated.

Weights: scale = absmax / 448 per row (or over the whole tensor), values = W / scale rounded to E4M3.
Activations: "token" quantizes each input row at run time (dynamic); "tensor" uses one static
scale per linear, absmax / 448 of the inputs it saw on the calibration text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kiln.errors import KilnError
from kiln.kernels.activation_quant import FP8, FP8_MAX, round_to
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears


def quantize_fp8(
    weight: torch.Tensor, per_channel: bool = True, input_scale: torch.Tensor | None = None
) -> QuantizedWeight:
    """W [N, K] -> E4M3 values and float32 scales [N, 1] (per tensor: one scale repeated)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().expand(w.shape[0], 1)
    scales = amax / FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales)).contiguous()
    activations = "dynamic" if input_scale is None else "static"
    return QuantizedWeight(
        round_to(w / scales, FP8), scales, None, 8, w.shape[1], activations=activations, input_scale=input_scale
    )


def linears_to_quantize(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The model's nn.Linear modules by name, but lm_head (the pass decides on it) and a vision tower's."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name.split(".") and "vision" not in name
    }


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    names: Sequence[str],
    samples: Sequence[torch.Tensor],
    record: Callable[[str, torch.Tensor], None],
) -> None:
    """Run the model on each calibration sample, calling `record(name, input)` for every input a named linear reads."""
    modules = dict(model.named_modules())
    hooks = []
    for name in names:

        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            record(name, args[0].detach())

        hooks.append(modules[name].register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for ids in samples:
            model(input_ids=ids.to(device)[None])
    finally:
        for handle in hooks:
            handle.remove()


@torch.no_grad()
def input_absmax(model: torch.nn.Module, names: Sequence[str], samples: Sequence[torch.Tensor]) -> dict[str, float]:
    """The largest |input| each named linear sees while the model reads the calibration samples."""
    seen = dict.fromkeys(names, 0.0)

    def record(name: str, x: torch.Tensor) -> None:
        seen[name] = max(seen[name], float(x.abs().amax()))

    calibrate(model, names, samples, record)
    return seen


def fp8_linears(model: torch.nn.Module, per_channel: bool, samples: Sequence[torch.Tensor] | None) -> QuantizedLinears:
    """Every linear of `model` (see `linears_to_quantize`) in FP8; static input scales when `samples`."""
    linears = linears_to_quantize(model)
    if not linears:
        raise KilnError("fp8 found no linear layer to quantize in this model")
    amax = input_absmax(model, list(linears), samples) if samples is not None else {}
    weights = {}
    for name, module in linears.items():
        scale = None
        if samples is not None:
            scale = torch.tensor([max(amax[name], 1e-12) / FP8_MAX], dtype=torch.float32)
        weights[f"{name}.weight"] = quantize_fp8(module.weight, per_channel, scale)
    k = next(iter(linears.values())).in_features
    return QuantizedLinears("fp8", 8, k, weights)


__all__ = ["calibrate", "fp8_linears", "input_absmax", "linears_to_quantize", "quantize_fp8"]
