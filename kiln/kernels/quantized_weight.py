"""A quantized linear weight: the one form that quantizers, checkpoint readers, the build's
quantization pass and the kernels agree on.

Unpacked form (`QuantizedWeight`), for a dense weight W of shape [N, K] (out, in features):
  values  int8 [N, K]: bits=8 signed (-128..127); bits=4 unsigned (0..15); or float8_e4m3fn
          [N, K] (FP8, bits=8, no zeros)
  scales  [N, K // group_size], floating (the model dtype or float32)
  zeros   [N, K // group_size], the same dtype as scales, integer-valued (0..15 for bits=4), or None (symmetric)
  perm    int64 [K] or None: the input columns in the order `values` holds them (GPTQ act-order);
          W[:, perm[j]] is stored column j, so x @ W.T == x[..., perm] @ stored.T
  W[n, perm[k]] = (values[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]

A per-output-channel weight has group_size == K (one group); a per-tensor one repeats its scale.
`activations` says how the op quantizes its input (`kiln.kernels.activation_quant`): "none"
(weight-only), "dynamic" (per token) or "static" (one `input_scale` [1], float32), to the
weight's type (FP8 E4M3 or int8). `pack` turns the unpacked form into
the tensors a program carries (`PackedWeight`); `dequantize_packed` is their plain PyTorch meaning,
which the CPU path and every kernel test use.

Packed int4 layout: uint8 [N, K // 2]; byte j of a row holds column j in its low nibble and column
j + K // 2 in its high nibble (a kernel then reads both halves of K with two plain loads, no
interleaving).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)
FP8 = torch.float8_e4m3fn
VALUE_DTYPES = (torch.int8, FP8)
ACTIVATIONS = ("none", "dynamic", "static")


@dataclass(frozen=True)
class QuantizedWeight:
    values: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    perm: torch.Tensor | None = None
    activations: str = "none"
    input_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.values.shape
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.values.dtype not in VALUE_DTYPES:
            raise ValueError(f"values must be int8 or float8_e4m3fn, got {self.values.dtype}")
        if self.values.dtype == FP8 and (self.bits != 8 or self.zeros is not None):
            raise ValueError("FP8 values are 8 bits with no zero points")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if (self.activations == "static") != (self.input_scale is not None):
            raise ValueError("a static activation scale (input_scale) goes with activations='static' only")
        if self.input_scale is not None and tuple(self.input_scale.shape) != (1,):
            raise ValueError(f"input_scale must be [1], got {list(self.input_scale.shape)}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide in_features {k}")
        groups = (n, k // self.group_size)
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"scales must be {list(groups)}, got {list(self.scales.shape)}")
        if self.zeros is not None and (tuple(self.zeros.shape) != groups or self.zeros.dtype != self.scales.dtype):
            raise ValueError(f"zeros must be {list(groups)} of {self.scales.dtype}")
        if self.bits == 4 and k % 2:
            raise ValueError(f"int4 needs an even in_features, got {k}")
        if self.perm is not None and tuple(self.perm.shape) != (k,):
            raise ValueError(f"perm must have {k} entries, got {list(self.perm.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [N, K] weight in the input column order (perm undone), in `dtype` (default: scales')."""
        packed = pack(self)
        return dequantize_packed(packed.qweight, packed.scales, packed.zeros, packed.perm, self.group_size, dtype)


@dataclass(frozen=True)
class PackedWeight:
    """What a program carries for one quantized linear (the op's arguments)."""

    qweight: torch.Tensor  # int8 or float8_e4m3fn [N, K] (bits=8) or uint8 [N, K // 2] (bits=4)
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] of 0..15 -> uint8 [N, K // 2] (column j low nibble, column j + K // 2 high)."""
    half = values.shape[1] // 2
    low = values[:, :half].to(torch.uint8)
    high = values[:, half:].to(torch.uint8)
    return (low | (high << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 [N, K] of 0..15 (the inverse of `pack_int4`)."""
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.cat([low, high], dim=1)


def pack(weight: QuantizedWeight) -> PackedWeight:
    qweight = pack_int4(weight.values) if weight.bits == 4 else weight.values.contiguous()
    return PackedWeight(qweight, weight.scales.contiguous(), weight.zeros, weight.perm)


def bits_of(qweight: torch.Tensor) -> int:
    """4 for a packed int4 weight (uint8), 8 for int8."""
    return 4 if qweight.dtype == torch.uint8 else 8


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The dense [N, K] weight a packed one stands for, columns in input order; computed in float32."""
    values = unpack_int4(qweight) if bits_of(qweight) == 4 else qweight
    w = values.float()
    if zeros is not None:
        w = w - zeros.float().repeat_interleave(group_size, dim=1)
    w = w * scales.float().repeat_interleave(group_size, dim=1)
    if perm is not None:
        dense = torch.empty_like(w)
        dense[:, perm] = w
        w = dense
    return w.to(dtype or scales.dtype)
