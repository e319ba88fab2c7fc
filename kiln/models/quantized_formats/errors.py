"""The error a quantized checkpoint kiln cannot read raises, always naming what is supported."""

from __future__ import annotations

from kiln.errors import UnsupportedModelError

SUPPORTED = (
    "kiln reads these pre-quantized checkpoints: AWQ (version gemm, 4-bit), GPTQ (4 or 8 bits, "
    "gptq or gptq_v2 checkpoint format, with or without desc_act), compressed-tensors pack-quantized "
    "weight-only int4/int8 (W4A16, W8A16) and float-quantized FP8 (FP8, FP8_DYNAMIC), and block-wise FP8 "
    "(quant_method fp8 with weight_block_size); or build from the unquantized checkpoint with "
    "`kiln build --quantization int8_wo|int4_wo|int4_awq|fp8`"
)


class UnsupportedQuantizationError(UnsupportedModelError):
    """A checkpoint's quantization format (or one of its settings) that kiln cannot load."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}. {SUPPORTED}")
