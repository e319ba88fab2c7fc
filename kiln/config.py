"""Build and runtime settings: frozen dataclasses that reject unknown or invalid fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

from kiln.errors import KilnError

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_INPUT_LEN = 1024
DEVICES = ("auto", "cpu", "cuda")
KERNEL_CHOICES = ("auto", "reference")  # auto: the Triton kernels where they apply
QUANTIZATIONS = ("none", "int8_wo", "int4_wo", "int4_awq", "int4_gptq", "fp8", "int8_sq")  # at build
ACT_SCALES = ("token", "tensor")  # W8A8 inputs: dynamic per token, or static per tensor from calibration
WEIGHT_SCALES = ("channel", "tensor")  # W8A8 weights: one scale per output channel, or one per tensor
KV_CACHE_DTYPES = ("auto", "fp8", "int8")  # auto: the model's dtype
GROUP_SIZES = (32, 64, 128)  # int4: columns of K that share one scale and zero point
# What an engine's linears may be quantized with: the build's methods and the checkpoint formats kiln reads.
QUANTIZATION_METHODS = (
    "int8_wo",
    "int4_wo",
    "int4_awq",
    "awq",
    "gptq",
    "compressed-tensors",
    "fp8",
    "fp8_block",
    "int8_sq",
)

T = TypeVar("T")


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype for one of DTYPES."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def kv_cache_torch_dtype(config: "BuildConfig") -> "torch.dtype":
    """The dtype an engine's KV cache is stored in."""
    import torch

    narrow = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
    return narrow.get(config.kv_cache_dtype) or torch_dtype(config.dtype)


def _from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise KilnError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    return cls(**values)


def _check_bools(config: object) -> None:
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if f.type in ("bool", "bool | None") and not (isinstance(value, bool) or (value is None and "None" in f.type)):
            raise KilnError(f"{type(config).__name__}.{f.name} must be true or false, got {value!r}")


def _check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KilnError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def check_quantization_method(method: str) -> None:
    if method not in QUANTIZATION_METHODS:
        raise KilnError(f"unsupported quantization method {method!r}; kiln supports {', '.join(QUANTIZATION_METHODS)}")


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KilnError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Limits and choices fixed when an engine is built."""

    dtype: str = field(default="float32", metadata={"choices": DTYPES, "help": "weight and activation dtype"})
    device: str = field(default="auto", metadata={"choices": DEVICES, "help": "auto: cuda when available"})
    max_batch_size: int = field(default=8, metadata={"help": "most sequences in one step"})
    max_input_len: int | None = field(
        default=None, metadata={"help": "longest prompt (default: min(1024, max-seq-len))"}
    )
    max_seq_len: int | None = field(
        default=None,
        metadata={
            "help": "longest prompt + generated tokens (default: min(2048, the model's max_position_embeddings))"
        },
    )
    max_num_tokens: int = field(default=2048, metadata={"help": "most tokens computed in one step"})
    tokens_per_block: int = field(default=16, metadata={"help": "KV-cache block size in tokens"})
    compile: bool = field(
        default=True,
        metadata={"help": "compile with Inductor (--no-compile: the engine runs the captured graph op by op)"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own Python code to run"})
    max_multimodal_len: int | None = field(
        default=None,
        metadata={
            "help": "vision-language models: image-feature rows the vision engine is sized for over a batch "
            "(default: one largest image per request)"
        },
    )
    max_encoder_input_len: int | None = field(
        default=None,
        metadata={"help": "encoder-decoder models: longest encoder input in tokens (default: max_input_len)"},
    )
    fused_linears: bool = field(
        default=True,
        metadata={"help": "fuse norms, activations, residual adds and rotary embeddings into the decode linears"},
    )
    fuse_rope: bool = field(
        default=True, metadata={"help": "with fused linears, also fuse the rotary embedding into the q/k/v projection"}
    )
    combo_kernels: bool = field(
        default=True, metadata={"help": "CUDA: Inductor launches independent small kernels as one"}
    )
    pdl: bool = field(
        default=True,
        metadata={"help": "CUDA, compute capability 9+: kernels launch with programmatic dependent launch"},
    )
    quantization: str = field(
        default="none",
        metadata={
            "choices": QUANTIZATIONS,
            "help": "quantization of the linears: weight-only int8 per output channel, int4 per group (round to "
            "nearest), int4 with AWQ's scale search; fp8: E4M3 weights and activations (a GPU of compute "
            "capability 8.9+, emulated on the CPU); int8_sq: SmoothQuant W8A8 int8 (needs --calib-data); "
            "a pre-quantized checkpoint needs none",
        },
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "choices": KV_CACHE_DTYPES,
            "help": "KV cache storage: the model's dtype, or fp8 (E4M3) / int8 with one scale per layer from "
            "--calib-data (fp8 without it: scale 1.0), twice the tokens in the same memory",
        },
    )
    smoothquant_alpha: float = field(
        default=0.5, metadata={"help": "int8_sq: how much of the activations' range moves into the weights (0..1)"}
    )
    act_scales: str = field(
        default="token",
        metadata={
            "choices": ACT_SCALES,
            "help": "fp8, int8_sq: activation scales dynamic per token, or static per tensor from --calib-data",
        },
    )
    weight_scales: str = field(
        default="channel", metadata={"choices": WEIGHT_SCALES, "help": "fp8, int8_sq: weight scales per row or tensor"}
    )
    group_size: int = field(
        default=128, metadata={"choices": GROUP_SIZES, "help": "int4: input columns sharing a scale and zero point"}
    )
    quantize_lm_head: bool = field(
        default=False, metadata={"help": "also quantize lm_head (int8 per channel with int8_wo, else as the others)"}
    )
    calib_data: str | None = field(
        default=None,
        metadata={"help": "int4_awq, int8_sq, fp8 with --act-scales tensor: a file of calibration text (required)"},
    )
    calib_size: int = field(default=64, metadata={"help": "calibration samples of 512 tokens taken from --calib-data"})
    tp_size: int = field(
        default=1, metadata={"help": "tensor-parallel ranks: one program per rank, run under torchrun"}
    )
    pp_size: int = field(default=1, metadata={"help": "pipeline stages: the layers split over as many ranks"})

    def __post_init__(self) -> None:
        _check_choice("BuildConfig", "dtype", self.dtype, DTYPES)
        _check_choice("BuildConfig", "quantization", self.quantization, QUANTIZATIONS)
        _check_choice("BuildConfig", "act_scales", self.act_scales, ACT_SCALES)
        _check_choice("BuildConfig", "weight_scales", self.weight_scales, WEIGHT_SCALES)
        _check_choice("BuildConfig", "kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        alpha = self.smoothquant_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise KilnError(f"BuildConfig.smoothquant_alpha must be a number in [0, 1], got {alpha!r}")
        if self.group_size not in GROUP_SIZES:
            raise KilnError(f"BuildConfig.group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        _check_int("BuildConfig", "calib_size", self.calib_size, 1)
        _check_int("BuildConfig", "tp_size", self.tp_size, 1)
        _check_int("BuildConfig", "pp_size", self.pp_size, 1)
        if self.calib_data is not None and not isinstance(self.calib_data, str):
            raise KilnError(f"BuildConfig.calib_data must be a file path, got {self.calib_data!r}")
        _check_choice("BuildConfig", "device", self.device, DEVICES)
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            if getattr(self, name) is not None or name not in ("max_input_len", "max_seq_len"):
                _check_int("BuildConfig", name, getattr(self, name), 1)
        for name in ("max_multimodal_len", "max_encoder_input_len"):
            if getattr(self, name) is not None:
                _check_int("BuildConfig", name, getattr(self, name), 1)
        if self.max_input_len is not None and self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise KilnError(f"max_input_len ({self.max_input_len}) cannot exceed max_seq_len ({self.max_seq_len})")
        if self.max_num_tokens < self.max_batch_size:
            raise KilnError(
                f"max_num_tokens ({self.max_num_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): every running sequence needs one token per step"
            )
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise KilnError(f"tokens_per_block must be a power of two, got {self.tokens_per_block}")
        _check_bools(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "BuildConfig":
        return _from_mapping(cls, values)

    def resolved(self, max_positions: int | None) -> "BuildConfig":
        """Fill the limits left unset from the model; refuse a max_seq_len beyond its positions."""
        seq_len = self.max_seq_len
        if seq_len is None:
            seq_len = min(DEFAULT_MAX_SEQ_LEN, max_positions or DEFAULT_MAX_SEQ_LEN)
        elif max_positions is not None and seq_len > max_positions:
            raise KilnError(
                f"max_seq_len {seq_len} exceeds the model's max_position_embeddings ({max_positions}); "
                f"build with --max-seq-len {max_positions} or less"
            )
        input_len = self.max_input_len if self.max_input_len is not None else min(DEFAULT_MAX_INPUT_LEN, seq_len)
        return dataclasses.replace(self, max_seq_len=seq_len, max_input_len=input_len)

    @property
    def seq_len(self) -> int:
        """max_seq_len of a resolved config (every engine's manifest holds one)."""
        if self.max_seq_len is None:
            raise KilnError("max_seq_len is not resolved; call BuildConfig.resolved() first")
        return self.max_seq_len

    @property
    def input_len(self) -> int:
        """max_input_len of a resolved config."""
        if self.max_input_len is None:
            raise KilnError("max_input_len is not resolved; call BuildConfig.resolved() first")
        return self.max_input_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Choices made when an engine is loaded."""

    num_kv_blocks: int | None = field(default=None, metadata={"help": "KV-cache blocks (default: sized from memory)"})
    # On a GPU, the share of free memory after loading given to the KV pool; None: all that is left
    # after one measured full-size step and a little headroom (kiln.runtime.memory_plan).
    kv_cache_memory_fraction: float | None = field(
        default=None,
        metadata={
            "help": "on a GPU, the fraction of free memory (after loading) given to the KV-cache pool (default: all "
            "memory left after one measured step at the build limits, less 2% of the device)"
        },
    )
    use_compiled: bool = field(
        default=True,
        metadata={
            "flag": "eager",
            "inverted": True,
            "help": "run the captured graph op by op instead of the compiled one",
        },
    )
    enable_prefix_caching: bool = field(
        default=True, metadata={"flag": "prefix-caching", "help": "reuse cached blocks of earlier prompts"}
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "on CUDA, decode steps replay CUDA graphs (--no-cuda-graphs: op by op)"}
    )
    overlap_decode: bool | None = field(
        default=None,
        metadata={"help": "launch each decode step before reading the previous one's tokens (default: on CUDA only)"},
    )
    attention_kernel: str = field(
        default="auto",
        metadata={
            "choices": KERNEL_CHOICES,
            "help": "paged attention: Triton on CUDA and batched SDPA on CPU (auto), or the PyTorch reference",
        },
    )
    linear_kernel: str = field(
        default="auto",
        metadata={"choices": KERNEL_CHOICES, "help": "decode linears: Triton where it is faster (auto) or PyTorch"},
    )
    argmax_kernel: str = field(
        default="auto",
        metadata={"choices": KERNEL_CHOICES, "help": "greedy sampling: Triton on CUDA (auto) or torch.argmax"},
    )
    collective_timeout_s: float = field(
        default=60.0,
        metadata={"help": "tensor-parallel engines: seconds a rank waits on the others before it stops with an error"},
    )

    def __post_init__(self) -> None:
        if self.num_kv_blocks is not None:
            _check_int("RuntimeConfig", "num_kv_blocks", self.num_kv_blocks, 1)
        if self.kv_cache_memory_fraction is not None and not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise KilnError(
                f"RuntimeConfig.kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if isinstance(self.collective_timeout_s, bool) or not (
            isinstance(self.collective_timeout_s, (int, float)) and self.collective_timeout_s > 0
        ):
            raise KilnError(f"RuntimeConfig.collective_timeout_s must be > 0, got {self.collective_timeout_s!r}")
        for name in ("attention_kernel", "linear_kernel", "argmax_kernel"):
            _check_choice("RuntimeConfig", name, getattr(self, name), KERNEL_CHOICES)
        _check_bools(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RuntimeConfig":
        return _from_mapping(cls, values)
