"""Build and runtime settings: frozen dataclasses that reject unknown or invalid fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

from kiln.errors import KilnError

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_SEQ_LEN = 2048
DEFAULT_MAX_INPUT_LEN = 1024
DEVICES = ("auto", "cpu", "cuda")

T = TypeVar("T")


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype for one of DTYPES."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise KilnError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
    return cls(**values)


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KilnError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Limits and choices fixed when an engine is built."""

    dtype: str = "float32"
    device: str = "auto"
    max_batch_size: int = 8
    max_input_len: int | None = None  # None: min(1024, max_seq_len)
    max_seq_len: int | None = None  # None: min(2048, the model's max_position_embeddings)
    max_num_tokens: int = 2048
    tokens_per_block: int = 16
    compile: bool = True
    trust_remote_code: bool = False
    max_multimodal_len: int | None = None  # vision-language engines: image-feature rows over a batch (None: auto)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KilnError(f"BuildConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise KilnError(f"BuildConfig.device must be one of {DEVICES}, got {self.device!r}")
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            if getattr(self, name) is not None or name not in ("max_input_len", "max_seq_len"):
                _check_int("BuildConfig", name, getattr(self, name), 1)
        if self.max_multimodal_len is not None:
            _check_int("BuildConfig", "max_multimodal_len", self.max_multimodal_len, 1)
        if self.max_input_len is not None and self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise KilnError(f"max_input_len ({self.max_input_len}) cannot exceed max_seq_len ({self.max_seq_len})")
        if self.max_num_tokens < self.max_batch_size:
            raise KilnError(
                f"max_num_tokens ({self.max_num_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): every running sequence needs one token per step"
            )
        if self.tokens_per_block & (self.tokens_per_block - 1):
            raise KilnError(f"tokens_per_block must be a power of two, got {self.tokens_per_block}")

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

    num_kv_blocks: int | None = None
    # On a GPU, the share of free memory after loading given to the KV pool; None: all that is left
    # after one measured full-size step and a little headroom (kiln.runtime.memory_plan).
    kv_cache_memory_fraction: float | None = None
    use_compiled: bool = True
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA engines only)
    # Launch each decode step before reading the previous one's tokens (None: on CUDA only).
    overlap_decode: bool | None = None

    def __post_init__(self) -> None:
        if self.num_kv_blocks is not None:
            _check_int("RuntimeConfig", "num_kv_blocks", self.num_kv_blocks, 1)
        if self.kv_cache_memory_fraction is not None and not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise KilnError(
                f"RuntimeConfig.kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RuntimeConfig":
        return _from_mapping(cls, values)
