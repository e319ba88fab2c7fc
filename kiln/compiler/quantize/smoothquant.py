"""SmoothQuant W8A8 int8: move activation outliers into the weights, then int8 weights and inputs.

For each group of linears that read one RMSNorm's output (q/k/v, gate/up), the input channels get
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (max over the calibration tokens and the group's weight
rows); the norm's weight is divided by s and the linears' input columns multiplied by s, so the
model in full precision computes the same function. Every decoder-layer linear (o_proj and
down_proj unsmoothed) is then int8 per output channel or per tensor, and its input int8 per token
(dynamic) or per tensor (static: absmax / 127 of the smoothed inputs on the calibration text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.compiler.quantize.awq import decoder_layers, layout_of
from kiln.compiler.quantize.fp8 import calibrate, input_absmax
from kiln.errors import KilnError
from kiln.kernels.activation_quant import INT8_MAX
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears

METHOD = "int8_sq"
MIN_SCALE = 1e-5


@torch.no_grad()
def channel_absmax(
    model: torch.nn.Module, names: Sequence[str], samples: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of each named linear over the calibration samples (float32 [K])."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        amax = x.float().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        seen[name] = amax if name not in seen else torch.maximum(seen[name], amax)

    calibrate(model, names, samples, record)
    return seen


@torch.no_grad()
def smooth(model: torch.nn.Module, samples: Sequence[torch.Tensor], alpha: float) -> list[str]:
    """Fold SmoothQuant's scales into each norm-fed group of linears; returns every decoder-layer linear's name."""
    if not 0.0 <= alpha <= 1.0:
        raise KilnError(f"--smoothquant-alpha must be in [0, 1], got {alpha}")
    groups = layout_of(model)
    names = {id(m): n for n, m in model.named_modules()}
    plan: list[tuple[torch.Tensor, list[torch.nn.Linear]]] = []
    linears: list[str] = []
    for layer in decoder_layers(model):
        for group in groups:
            members = [_linear(layer, path) for path in group.linears]
            linears += [names[id(m)] for m in members]
            if isinstance(layer.get_submodule(group.prev), torch.nn.Linear):
                continue  # only norms take the scales (o_proj, down_proj stay unsmoothed)
            norm_weight = layer.get_submodule(group.prev).weight
            assert isinstance(norm_weight, torch.Tensor)
            plan.append((norm_weight, members))
    act = channel_absmax(model, [names[id(m)] for _, ms in plan for m in ms[:1]], samples)
    for norm, members in plan:
        x_max = act[names[id(members[0])]].clamp(min=MIN_SCALE)
        w_max = torch.stack([m.weight.float().abs().amax(dim=0) for m in members]).amax(dim=0).clamp(min=MIN_SCALE)
        s = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=MIN_SCALE)
        norm.div_(s.to(norm.dtype))
        for m in members:
            m.weight.mul_(s.to(m.weight.dtype))
    return list(dict.fromkeys(linears))


def _linear(layer: torch.nn.Module, path: str) -> torch.nn.Linear:
    module = layer.get_submodule(path)
    if not isinstance(module, torch.nn.Linear):
        raise KilnError(f"SmoothQuant expected a linear layer at {path}, found {type(module).__name__}")
    return module


def quantize_int8_w8a8(weight: torch.Tensor, per_channel: bool, input_scale: torch.Tensor | None) -> QuantizedWeight:
    """W [N, K] -> int8 -127..127 with float32 scales [N, 1] (per tensor: one scale repeated)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().expand(w.shape[0], 1)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).contiguous()
    values = torch.round(w / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    activations = "dynamic" if input_scale is None else "static"
    return QuantizedWeight(values, scales, None, 8, w.shape[1], activations=activations, input_scale=input_scale)


def smoothquant(
    model: torch.nn.Module,
    samples: Sequence[torch.Tensor],
    alpha: float,
    per_channel: bool,
    per_token: bool,
    smoothing: bool = True,
) -> QuantizedLinears:
    """Smooth `model` in place (unless not `smoothing`: plain W8A8 round-to-nearest) and return its
    decoder-layer linears in int8 W8A8, keyed by parameter name."""
    if not samples:
        raise KilnError("SmoothQuant needs calibration text: --calib-data FILE")
    if smoothing:
        names = smooth(model, samples, alpha)
    else:
        layout_of(model)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]
    amax = {} if per_token else input_absmax(model, names, samples)
    modules = dict(model.named_modules())
    weights = {}
    for name in names:
        scale = None if per_token else torch.tensor([max(amax[name], 1e-12) / INT8_MAX], dtype=torch.float32)
        weights[f"{name}.weight"] = quantize_int8_w8a8(modules[name].weight, per_channel, scale)
    return QuantizedLinears(METHOD, 8, -1, weights)


__all__ = ["channel_absmax", "quantize_int8_w8a8", "smooth", "smoothquant"]
