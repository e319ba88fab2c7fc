"""Activation-aware int4 weight quantization (AWQ), searched on calibration text.

For each decoder layer, the inputs of every group of linears that share an input are recorded on
the calibration tokens. A group's input channels get scales s = mean|x|^a / mean|w|^(1-a)
(normalised to a geometric mean of 1), `a` picked on a grid (or s = 1) to minimise the output error
of the group's int4 weights: W's input columns are multiplied by s and 1/s is folded into what
produces the input (the RMSNorm weight, or the previous linear's output rows), so the model in full
precision computes the same function. Then each linear's per-group range is shrunk where that lowers
its output error (clipping, not for q/k whose outputs go through rotary embeddings and softmax), and
it is rounded to int4 with a zero point per group. The model's linears are left holding the
dequantized weights (what the build's quantization pass puts back in packed form); the next layer
is calibrated on this layer's quantized outputs.

Output errors are measured exactly through the inputs' Gram matrix: |X W^T - X Q^T|^2 = tr(D X^T X D^T)
for D = W - Q.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import KilnError, UnsupportedModelError
from kiln.kernels.quantized_weight import QuantizedWeight
from kiln.models.quantized_checkpoint import QuantizedLinears
from kiln.progress import Progress

METHOD = "int4_awq"
BITS = 4
LEVELS = 15  # int4: 0..15
SCALE_GRID = 20  # a in {0, 1/20, ..., 19/20}
CLIP_RATIOS = tuple(1.0 - i / 40 for i in range(21))  # the per-group range shrunk down to half
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears (paths inside a decoder layer) that read the output of `prev` (a norm or a linear)."""

    prev: str
    linears: tuple[str, ...]


LLAMA_LIKE = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # only when v's outputs are o's inputs (no GQA)
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)
# model_type -> its decoder layer's groups; the norms multiply by their weight (x / rms * w)
LAYOUTS: dict[str, tuple[ScaleGroup, ...]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}


def layout_of(model: torch.nn.Module) -> tuple[ScaleGroup, ...]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedModelError(
            f"AWQ search supports the model types {sorted(LAYOUTS)} (Llama-style decoder layers); "
            f"this model is {model_type!r}: quantize it with round-to-nearest or use an AWQ checkpoint"
        )
    return LAYOUTS[model_type]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers: AWQ search cannot walk it")
    return layers


def _fake_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """What `_rtn_int4(w).dequantize()` gives, in float32 (scales rounded to `dtype` as they are stored)."""
    values, scale, zero = _rtn_parts(w, group_size, dtype)
    return ((values - zero[..., None]) * scale[..., None]).reshape(w.shape)


def _rtn_parts(w: torch.Tensor, group_size: int, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    high = groups.amax(-1).clamp(min=0)  # the range always holds 0, so the zero point is in 0..15
    low = groups.amin(-1).clamp(max=0)
    scale = ((high - low) / LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
    if dtype is not None:
        scale = scale.to(dtype).float()
    zero = torch.round(-low / scale).clamp(0, LEVELS)
    values = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, LEVELS)
    return values, scale, zero


def _rtn_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Asymmetric int4 per group of `group_size` input columns: scale = (max - min) / 15 over a range
    that holds 0, zero = round(-min / scale); scales and zeros in the weight's dtype."""
    values, scale, zero = _rtn_parts(weight, group_size, weight.dtype)
    return QuantizedWeight(
        values=values.reshape(weight.shape).to(torch.int8),
        scales=scale.to(weight.dtype),
        zeros=zero.to(weight.dtype),
        bits=BITS,
        group_size=group_size,
    )


def _output_error(diff: torch.Tensor, gram: torch.Tensor) -> float:
    """|X diff^T|^2 / tokens for the Gram matrix X^T X / tokens."""
    return float(((diff @ gram) * diff).sum())


def search_scale(
    x_mean: torch.Tensor, gram: torch.Tensor, weights: Sequence[torch.Tensor], group_size: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """The per-input-channel scale (float32 [K]) that minimises the group's int4 output error; None if
    no scale beats s = 1."""
    w = torch.cat([t.float() for t in weights])
    n, k = w.shape
    grouped = w.abs().reshape(n, k // group_size, group_size)
    w_mean = (grouped / grouped.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(n, k).mean(0)
    x = x_mean.clamp(min=1e-8)
    wm = w_mean.clamp(min=1e-8)
    best, best_error = None, _output_error(w - _fake_int4(w, group_size, dtype), gram)
    for step in range(SCALE_GRID):
        a = step / SCALE_GRID
        s = (x.pow(a) / wm.pow(1 - a)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = _output_error(w - _fake_int4(w * s, group_size, dtype) / s, gram)
        if error < best_error:
            best, best_error = s, error
    return best


def search_clip(w: torch.Tensor, gram: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """`w` (float32) with each (row, group) range shrunk by the ratio that minimises that group's output error."""
    n, k = w.shape
    groups = k // group_size
    blocks = gram.reshape(groups, group_size, groups, group_size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    grouped = w.reshape(n, groups, group_size)
    high = grouped.amax(-1, keepdim=True).clamp(min=0)
    low = grouped.amin(-1, keepdim=True).clamp(max=0)
    best = grouped.clone()
    best_error = torch.full((n, groups), float("inf"), device=w.device)
    for ratio in CLIP_RATIOS:
        clipped = torch.maximum(torch.minimum(grouped, high * ratio), low * ratio)
        diff = grouped - _fake_int4(clipped.reshape(n, k), group_size, dtype).reshape(n, groups, group_size)
        error = torch.einsum("ngi,gij,ngj->ng", diff, blocks, diff)
        better = error < best_error
        best = torch.where(better[..., None], clipped, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(n, k)


def fold_scale(prev: torch.nn.Module, linears: Sequence[torch.nn.Linear], s: torch.Tensor) -> None:
    """Divide what `prev` outputs by `s` and multiply the linears' input columns by it (same function)."""
    with torch.no_grad():
        if isinstance(prev, torch.nn.Linear):
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:
            weight = prev.weight
            assert isinstance(weight, torch.Tensor)
            weight.div_(s.to(weight.dtype))
        for linear in linears:
            linear.weight.mul_(s.to(linear.weight.dtype)[None, :])


def group_fits(prev: torch.nn.Module, linears: Sequence[torch.nn.Linear]) -> bool:
    """Whether `prev`'s outputs are exactly the linears' inputs, one channel each (not so for v -> o under GQA)."""
    k = linears[0].in_features
    if isinstance(prev, torch.nn.Linear):
        return prev.out_features == k
    weight = getattr(prev, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (k,)


class _Inputs:
    """Per linear of a layer: the mean |x| per input channel and the Gram matrix X^T X / tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.reader: dict[str, str] = {}  # linear -> the linear whose recorded input it shares

    def hook(self, name: str) -> Any:
        def record(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.sums[name] = self.sums.get(name, 0) + x.abs().sum(0)
            self.grams[name] = self.grams.get(name, 0) + x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return record

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.tokens[name]

    def gram(self, name: str) -> torch.Tensor:
        return self.grams[name] / self.tokens[name]


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    pass


def _layer_inputs(
    model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The first layer's hidden states for `ids` and every layer's other arguments (masks, rotary tables)."""
    kwargs: list[dict[str, Any]] = []
    first: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        kw = dict(kw)
        hidden = args[0] if args else kw.pop("hidden_states")
        if not first:
            first.append(hidden.detach())
        kwargs.append(kw)
        if len(kwargs) == len(layers):
            raise _Stop

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return first[0], kwargs


def _layer_linears(layer: torch.nn.Module, groups: Sequence[ScaleGroup], group_size: int) -> dict[str, torch.nn.Linear]:
    linears: dict[str, torch.nn.Linear] = {}
    for path in (p for group in groups for p in group.linears):
        linear = layer.get_submodule(path)
        if not isinstance(linear, torch.nn.Linear) or linear.in_features % group_size:
            raise KilnError(f"AWQ: {path} is not a linear whose inputs split into groups of {group_size}")
        linears[path] = linear
    return linears


def _record_inputs(
    layer: torch.nn.Module,
    groups: Sequence[ScaleGroup],
    linears: dict[str, torch.nn.Linear],
    hidden: Sequence[torch.Tensor],
    kwargs: Sequence[dict[str, Any]],
) -> _Inputs:
    """Run the layer on every calibration sample, recording each group's input once (at its first linear)."""
    inputs = _Inputs()
    inputs.reader = {p: group.linears[0] for group in groups for p in group.linears}
    handles = [linears[p].register_forward_pre_hook(inputs.hook(p)) for p in set(inputs.reader.values())]
    try:
        for h, kw in zip(hidden, kwargs):
            _run_layer(layer, h, kw)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _search_and_fold(
    layer: torch.nn.Module, groups: Sequence[ScaleGroup], linears: dict[str, torch.nn.Linear], inputs: _Inputs, g: int
) -> dict[str, torch.Tensor]:
    """Search and fold every group's scale; the scale each linear's input is now divided by."""
    scaled: dict[str, torch.Tensor] = {}
    for group in groups:
        prev = layer.get_submodule(group.prev)
        members = [linears[p] for p in group.linears]
        if not group_fits(prev, members):
            continue
        first = group.linears[0]
        dtype = members[0].weight.dtype
        s = search_scale(inputs.mean_abs(first), inputs.gram(first), [m.weight for m in members], g, dtype)
        if s is not None:
            fold_scale(prev, members, s)
            scaled.update({p: s for p in group.linears})
    return scaled


def _quantize_linear(linear: torch.nn.Linear, gram: torch.Tensor, group_size: int, clip: bool) -> QuantizedWeight:
    """Clip (when asked), round to int4 and leave `linear` holding the dequantized weight."""
    dtype = linear.weight.dtype
    w = linear.weight.float()
    if clip:
        w = search_clip(w, gram, group_size, dtype)
    quantized = _rtn_int4(w.to(dtype), group_size)
    linear.weight.copy_(quantized.dequantize(dtype))
    return quantized


@torch.no_grad()
def awq_quantize(
    model: torch.nn.Module,
    calibration_ids: list[torch.Tensor],
    group_size: int,
    *,
    clip: bool = True,
    progress: Progress | None = None,
) -> QuantizedLinears:
    """Search AWQ scales (and clipping) on `calibration_ids` (token id tensors, one sequence each),
    fold them into the model, quantize every decoder-layer linear to int4 with `group_size`, and leave
    the model holding the dequantized weights. Returns them keyed by parameter name."""
    groups = layout_of(model)
    layers = decoder_layers(model)
    if not calibration_ids or any(t.numel() == 0 for t in calibration_ids):
        raise KilnError("AWQ needs calibration text: give at least one non-empty sequence of token ids")
    device = next(model.parameters()).device
    names = {id(m): name for name, m in model.named_modules()}
    samples = [_layer_inputs(model, layers, t.reshape(1, -1).to(device)) for t in calibration_ids]
    hidden = [h for h, _ in samples]
    quantized: dict[str, QuantizedWeight] = {}
    for index, layer in enumerate(layers):
        stage = progress.stage("awq", f"layer {index + 1}/{len(layers)}") if progress is not None else nullcontext()
        with stage:
            linears = _layer_linears(layer, groups, group_size)
            inputs = _record_inputs(layer, groups, linears, hidden, [kwargs[index] for _, kwargs in samples])
            scaled = _search_and_fold(layer, groups, linears, inputs, group_size)
            for path, linear in linears.items():
                gram = inputs.gram(inputs.reader[path])
                if path in scaled:  # the input is now x / s
                    inv = 1.0 / scaled[path]
                    gram = gram * inv[:, None] * inv[None, :]
                do_clip = clip and path.rsplit(".", 1)[-1] not in NO_CLIP
                quantized[names[id(linear)] + ".weight"] = _quantize_linear(linear, gram, group_size, do_clip)
            hidden = [_run_layer(layer, h, kwargs[index]) for h, (_, kwargs) in zip(hidden, samples)]
    return QuantizedLinears(method=METHOD, bits=BITS, group_size=group_size, weights=quantized)
