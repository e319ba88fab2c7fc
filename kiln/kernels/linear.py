"""`kiln::linear`: `x @ weight.T + bias` that streams the weight with a Triton kernel when x has few rows.

A decode step's linears read a whole weight for 1..16 token rows, so they are bound by memory
bandwidth; `kiln.kernels.triton.gemv` reads the weight once at close to copy speed. The op takes
that path for CUDA fp16/bf16 inputs with one row (all of x's dims but the last), or with up to
`MAX_ROWS` rows when the weight has at least `MIN_MULTI_ROW_BYTES` (on an H100 the kernel beat
cuBLAS at one row for every Llama-3.2-1B / 3.1-8B projection, and at 4 and 16 rows only for
weights of 32 MiB and more: benchmarks/linear_kernels.py), when triton is importable and the
kernel selection's `linear` is not `reference` (`kiln.kernels.selection`); everything else (prefill, CPU, fp32,
small weights at 2..16 rows) is `torch.nn.functional.linear`. The choice depends on
shapes, dtypes and the device only, so the op can run inside CUDA graphs.

Every op also takes a weight-only quantized weight (`kiln.kernels.quantized_weight`): given
`scales`, `weight` is the packed qweight ([N, K] int8 or [N, K // 2] uint8), and the op runs
`quantized_dispatch.quantized_kernel` (CUDA), else dequantizes the weight to x's dtype for this
call and runs the dense path (the CPU path). The op is opaque to Inductor, so no program keeps
a dequantized weight. A W8A8 weight (FP8 or int8) also quantizes the op's input, after the
prologue: `activations` "dynamic" (per token) or "static" (`act_scale` [1]); on the CPU path as
`kiln.kernels.activation_quant.fake_quantize` does.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.kernels import reference
from kiln.kernels.activation_quant import fake_quantize
from kiln.kernels.quantized_weight import dequantize_packed
from kiln.kernels.selection import current
from kiln.kernels.triton_support import KERNEL_DTYPES, triton_importable

MAX_ROWS = 16
MIN_MULTI_ROW_BYTES = 32 << 20
InputQuant = tuple[str, torch.dtype, torch.Tensor | None]  # fake_quantize's mode, dtype, input_scale


def use_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fused: bool = False) -> bool:
    """Whether a call takes the Triton path (device, dtypes, row count, kernel selection). A fused call
    (prologue or residual) takes it at one row only: at 8 rows the fused tl.dot tiles ran the
    Llama-3.2-1B step 1.6x slower than cuBLAS with torch's rms_norm and addmm (H100)."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype and weight.dim() == 2):
        return False
    if weight.numel() >= 2**31:  # the kernel's offsets are 32-bit
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.dim() != 1):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    big = weight.numel() * weight.element_size() >= MIN_MULTI_ROW_BYTES
    if rows != 1 and (fused or not (1 < rows <= MAX_ROWS and big)):
        return False
    return current().linear != "reference" and triton_importable()


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    constant_weight: bool,
    residual: torch.Tensor | None,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    input_quant: InputQuant | None = None,
) -> torch.Tensor:
    """The three ops' shared body: the Triton kernel when `use_kernel`, else PyTorch (with the input
    fake-quantized after the prologue for a W8A8 weight: `input_quant`)."""
    in_features = weight.shape[1]
    rows = x.numel() // max(x.shape[-1], 1)
    flat = x.reshape(rows, x.shape[-1])
    fused = prologue != "none" or residual is not None
    kernel = input_quant is None and use_kernel(flat[:, :in_features], weight, bias, fused)
    if kernel and (residual is None or residual.dtype == x.dtype):
        residual_rows = None if residual is None else residual.reshape(rows, weight.shape[0])
        out = _kernel(flat, weight, bias, constant_weight, prologue, norm_weight, eps, residual=residual_rows)
        return out.view(*x.shape[:-1], weight.shape[0])
    # Many rows (prefill, large decode batches), or no kernel: PyTorch. On CUDA with the fused
    # kernels of torch (rms_norm, addmm's residual), rounding once where transformers rounds twice.
    if prologue == "silu_mul":
        x = _silu_mul(x)
    elif prologue == "rms_norm":
        assert norm_weight is not None
        if x.is_cuda:
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), norm_weight, eps)
        else:
            x = reference.rms_norm(x, norm_weight, eps)
    if input_quant is not None:
        x = fake_quantize(x, *input_quant)
    if residual is not None and x.is_cuda and bias is None:
        out = torch.addmm(residual.reshape(-1, weight.shape[0]), x.reshape(-1, in_features), weight.t())
        return out.view(*x.shape[:-1], weight.shape[0])
    out = torch.nn.functional.linear(x, weight, bias)
    return out if residual is None else residual + out


def _kernel(
    flat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    constant_weight: bool,
    prologue: str,
    norm_weight: torch.Tensor | None,
    eps: float,
    **epilogue: Any,
) -> torch.Tensor:
    """The Triton kernel on x's rows [M, K] (`kiln.kernels.triton.gemv.linear_triton`; epilogue: its
    residual / rope / gated keywords)."""
    from kiln.kernels.triton.gemv import linear_triton

    return linear_triton(
        flat,
        weight,
        None if bias is None else bias.contiguous(),
        constant_weight=constant_weight,
        prologue=prologue,
        norm_weight=None if norm_weight is None else norm_weight.contiguous(),
        eps=eps,
        **epilogue,
    )


def _quantized(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    constant_weight: bool,
    prologue: str = "none",
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
    **epilogue: Any,
) -> tuple[torch.Tensor | None, torch.Tensor, InputQuant | None]:
    """(the quantized kernel's output shaped like x's rows, or None; the dense weight when it is None;
    how the dense path then quantizes its input)."""
    from kiln.kernels.quantized_dispatch import quantized_kernel

    rows = x.numel() // max(x.shape[-1], 1)
    flat = x.reshape(rows, x.shape[-1])
    act = (activations, act_scale)
    quantized = (qweight, scales, zeros, perm, group_size, bias, constant_weight)
    out = quantized_kernel(flat, *quantized, prologue, norm_weight, eps, act, **epilogue)
    if out is not None:
        return out.view(*x.shape[:-1], out.shape[-1]), qweight, None
    input_quant = None if activations == "none" else (activations, qweight.dtype, act_scale)
    return None, dequantize_packed(qweight, scales, zeros, perm, group_size, x.dtype), input_quant


def _residual_rows(x: torch.Tensor, n: int, residual: torch.Tensor | None) -> dict[str, Any]:
    return {} if residual is None else {"residual": residual.reshape(x.numel() // max(x.shape[-1], 1), n)}


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one Triton pass on CUDA fp16/bf16 (the selection's `linear` not `reference`), else PyTorch."""
    if gate_up.is_cuda and gate_up.dtype in KERNEL_DTYPES and _triton_elementwise_ok():
        from kiln.kernels.triton.silu_mul import silu_mul

        return silu_mul(gate_up)
    return reference.silu_mul(gate_up)


@torch.library.custom_op("kiln::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    constant_weight: bool = False,
    residual: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = 0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[residual +] x @ weight.T + bias.

    constant_weight: no kernel ever writes `weight` (a model parameter); the kernel may then read
    it before the previous kernel has finished (see `kiln.kernels.triton.pdl`). residual: added
    to the product; the Triton kernel and the CPU path round the product to x's dtype first, as
    `residual + linear(x)` rounds; the CUDA path for many rows (addmm) rounds once.
    scales, zeros, perm, group_size: a packed quantized `weight` (see the module docstring)."""
    act, iq = (activations, act_scale), None
    if scales is not None:
        rows = _residual_rows(x, weight.shape[0], residual)
        out, weight, iq = _quantized(
            x, weight, scales, zeros, perm, group_size, bias, constant_weight, "none", None, 0.0, *act, **rows
        )
        if out is not None:
            return out
    return _linear(x, weight, bias, constant_weight, residual, input_quant=iq)


@torch.library.custom_op("kiln::silu_mul_linear", mutates_args=())
def silu_mul_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    constant_weight: bool = False,
    residual: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = 0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[residual +] linear(silu(gate) * up, weight, bias) for gate_up = [gate | up] on the last dim
    (a gated MLP's down projection, with its activation read straight from the fused gate/up output)."""
    act, iq = (activations, act_scale), None
    if scales is not None:
        rows = _residual_rows(gate_up, weight.shape[0], residual)
        out, weight, iq = _quantized(
            gate_up, weight, scales, zeros, perm, group_size, bias, constant_weight, "silu_mul", None, 0.0, *act, **rows
        )
        if out is not None:
            return out
    return _linear(gate_up, weight, bias, constant_weight, residual, prologue="silu_mul", input_quant=iq)


@torch.library.custom_op("kiln::rms_norm_linear", mutates_args=())
def rms_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    constant_weight: bool = False,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = 0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """linear(rms_norm(x) * norm_weight, weight, bias) with Llama's RMSNorm (`reference.rms_norm`)."""
    act, iq = (activations, act_scale), None
    if scales is not None:
        out, weight, iq = _quantized(
            x, weight, scales, zeros, perm, group_size, bias, constant_weight, "rms_norm", norm_weight, eps, *act
        )
        if out is not None:
            return out
    return _linear(x, weight, bias, constant_weight, None, "rms_norm", norm_weight, eps, input_quant=iq)


@torch.library.custom_op("kiln::linear_rope", mutates_args=())
def linear_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    constant_weight: bool,
    norm_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rope_width: int,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = 0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A fused q/k/v projection with its rotary embedding: linear([rms_norm(x) * norm_weight | x], weight,
    bias), then the first rope_width output columns (the query and key heads) rotated with cos/sin
    (one row of head_dim values per token of x: [..., head_dim]) as `reference.rope` rotates them.

    At one row the rotation is the projection kernel's epilogue; otherwise the projection as
    `kiln::linear` / `kiln::rms_norm_linear` runs it, then one rotary pass (Triton on CUDA)."""
    rows = x.numel() // max(x.shape[-1], 1)
    head_dim = cos.shape[-1]
    cos2, sin2 = cos.reshape(rows, head_dim), sin.reshape(rows, head_dim)
    prologue = "none" if norm_weight is None else "rms_norm"
    act, iq = (activations, act_scale), None
    if scales is not None:
        rope = (cos2.contiguous(), sin2.contiguous(), rope_width)
        quantized = (zeros, perm, group_size, bias, constant_weight, prologue, norm_weight, eps, *act)
        out, weight, iq = _quantized(x, weight, scales, *quantized, rope=rope)
        if out is not None:
            return out
    flat = x.reshape(rows, x.shape[-1])
    tables_ok = cos.dtype == sin.dtype == x.dtype and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0
    if iq is None and tables_ok and use_kernel(flat, weight, bias, fused=True):
        rope = (cos2.contiguous(), sin2.contiguous(), rope_width)
        out = _kernel(flat, weight, bias, constant_weight, prologue, norm_weight, eps, rope=rope)
        return out.view(*x.shape[:-1], weight.shape[0])
    out = _linear(x, weight, bias, constant_weight, None, prologue, norm_weight, eps, iq)
    out2 = out.reshape(rows, weight.shape[0])
    if tables_ok and out2.is_cuda and out2.dtype in KERNEL_DTYPES and _triton_elementwise_ok():
        from kiln.kernels.triton.rope import rope_

        rope_(out2, cos2.contiguous(), sin2.contiguous(), rope_width)  # out is this call's own tensor
        return out
    return reference.rope(out2, cos2, sin2, rope_width).view(out.shape)


@torch.library.custom_op("kiln::linear_silu_mul", mutates_args=())
def linear_silu_mul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    constant_weight: bool,
    norm_weight: torch.Tensor | None,
    eps: float,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    group_size: int = 0,
    activations: str = "none",
    act_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A gated MLP's fused gate/up projection with its activation: silu(gate) * up of
    linear([rms_norm(x) * norm_weight | x], weight = [gate | up], bias) -> [..., N / 2].

    At one row the kernel pairs each gate column with its up column and writes only the product
    (the down projection then reads half as much and recomputes nothing); otherwise the projection
    as `kiln::linear` / `kiln::rms_norm_linear` runs it, then one silu-mul pass."""
    rows = x.numel() // max(x.shape[-1], 1)
    prologue = "none" if norm_weight is None else "rms_norm"
    act, iq = (activations, act_scale), None
    if scales is not None:
        quantized = (zeros, perm, group_size, bias, constant_weight, prologue, norm_weight, eps, *act)
        out, weight, iq = _quantized(x, weight, scales, *quantized, gated=True)
        if out is not None:
            return out
    flat = x.reshape(rows, x.shape[-1])
    if iq is None and weight.shape[0] % 2 == 0 and x.shape[-1] > 0 and use_kernel(flat, weight, bias, fused=True):
        out = _kernel(flat, weight, bias, constant_weight, prologue, norm_weight, eps, gated=True)
        return out.view(*x.shape[:-1], weight.shape[0] // 2)
    return _silu_mul(_linear(x, weight, bias, constant_weight, None, prologue, norm_weight, eps, iq))


def _triton_elementwise_ok() -> bool:
    return current().linear != "reference" and triton_importable()


def _out_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # every path returns a new contiguous tensor


@linear.register_fake
def _linear_fake(x, weight, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    return _out_like(x, weight)  # the quantized arguments change nothing: N is weight.shape[0] packed or not


@silu_mul_linear.register_fake
def _silu_mul_linear_fake(gate_up, weight, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    return _out_like(gate_up, weight)


@rms_norm_linear.register_fake
def _rms_norm_linear_fake(x, norm_weight, eps, weight, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    return _out_like(x, weight)


@linear_rope.register_fake
def _linear_rope_fake(x, weight, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    return _out_like(x, weight)


@linear_silu_mul.register_fake
def _linear_silu_mul_fake(x, weight, *_args, **_kwargs):  # type: ignore[no-untyped-def]
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)
