"""The engine directory: its file names, the manifest, and the checks made before loading."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.config import BuildConfig, check_quantization_method
from kiln.errors import EngineMismatchError, KilnError
from kiln.kernels.w8a8_dispatch import fp8_refusal
from kiln.version import __version__

MANIFEST = "manifest.json"
PROGRAM = "program.pt2"
WEIGHTS = "weights.safetensors"  # the program's weights (kiln.engine.program_files)
COMPILED = "compiled.bin"
PROGRAM_INDEX = "program_index.json"  # what a compiled load needs from program.pt2 (kiln.engine.program_index)
TOKENIZER_DIR = "tokenizer"
PROCESSOR_DIR = "processor"
VISION_DIR = "vision"
ENCODER_DIR = "encoder"  # an encoder-decoder engine's encoder program
VISION_STATE = "state.safetensors"
FORMAT_VERSION = 3  # 2: weights in weights.safetensors beside program.pt2; 3: Mllama decoders take cross_spans [T, 2]


@dataclass(frozen=True, kw_only=True)
class ModelFacts:
    """What the runtime must know about the captured model."""

    architecture: str
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    has_chat_template: bool

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelFacts":
        values = dict(values)
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class MultimodalFacts:
    """What the runtime must know about a vision-language engine's two programs."""

    image_token_id: int
    hidden_size: int  # width of the LLM program's mm_embeds input
    max_multimodal_len: int  # image-feature rows the vision program is sized for (over a batch)
    vision_batch_limit: int  # largest size of the vision program's dynamic dimension
    position_rows: int  # 1, or 3 for M-RoPE
    bidirectional_images: bool  # the LLM program takes attend_end: image tokens see their whole image
    vision_compiled: bool
    family_config: dict[str, Any] = field(default_factory=dict)  # values the family's run-time hooks read

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MultimodalFacts":
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class EncoderDecoderFacts:
    """What the runtime must know about an encoder-decoder engine: its encoder program (in encoder/) and
    the tokens its decoder starts from. Each request's cache holds its encoder length, then its decoder tokens."""

    max_encoder_input_len: int
    decoder_prefix: tuple[int, ...]  # decoder_start_token_id, then forced_bos_token_id when the model forces one
    encoder_compiled: bool
    # the prompt's text runs in the decoder, the encoder input is the image rows alone (Mllama): the decoder
    # program takes each token's cross-attention rows (`cross_spans`) last
    decoder_prompt: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "decoder_prefix": list(self.decoder_prefix)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EncoderDecoderFacts":
        return cls(**{**values, "decoder_prefix": tuple(values["decoder_prefix"])})


@dataclass(frozen=True, kw_only=True)
class QuantizationFacts:
    """How the engine's linears are quantized; the embedding and a vision program never are."""

    method: str  # one of kiln.config.QUANTIZATION_METHODS
    bits: int
    group_size: int | None  # None: one scale per output channel
    layers: tuple[str, ...]  # the dense weights replaced by quantized ones (program parameter names)
    lm_head: bool
    activations: str | None = None  # W8A8: "fp8 dynamic per token", "fp8 static per tensor", ...; None: weight-only
    weights: str = "int"  # "int" or "fp8" (E4M3 values)

    def __post_init__(self) -> None:
        check_quantization_method(self.method)

    def to_dict(self) -> dict[str, Any]:
        """The block; a weight-only integer engine's has no `activations` / `weights` entries."""
        values = {**self.__dict__, "layers": list(self.layers)}
        if self.activations is None:
            del values["activations"]
        if self.weights == "int":
            del values["weights"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "QuantizationFacts":
        return cls(**{**values, "layers": tuple(values["layers"])})


@dataclass(frozen=True, kw_only=True)
class WorldFacts:
    """A tensor- or pipeline-parallel engine's layout: rank r's program is in `rank{r}/`, its KV pool holds
    `kv_heads_per_rank` heads (the model's split, or one replicated head where it has fewer than ranks).
    With `pp_size` stages rank r is tensor-parallel rank r % tp_size of stage r // tp_size, with the model's
    layers / pp_size layers, and stages pass hidden states of `hidden_size`."""

    tp_size: int
    kv_heads_per_rank: int
    pp_size: int = 1
    hidden_size: int = 0  # pipeline stages only

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @staticmethod
    def rank_dir(rank: int) -> str:
        return f"rank{rank}"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "WorldFacts":
        return cls(**values)


@dataclass(frozen=True)
class KVCacheFacts:
    """A narrow (FP8 / int8) KV cache: its dtype and the (k, v) scales of each layer, and where they came from."""

    dtype: str  # "fp8" or "int8"
    scales: tuple[tuple[float, float], ...]
    calibrated: bool  # False: FP8 with scale 1.0 (no --calib-data)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "scales": [list(s) for s in self.scales], "calibrated": self.calibrated}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "KVCacheFacts":
        scales = tuple((float(k), float(v)) for k, v in values["scales"])
        return cls(dtype=str(values["dtype"]), scales=scales, calibrated=bool(values["calibrated"]))


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device facts an engine is tied to."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "capability": None}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    kiln_version: str
    torch_version: str
    transformers_version: str
    format_version: int
    device: dict[str, Any]
    build: BuildConfig
    model: ModelFacts
    compiled: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    multimodal: MultimodalFacts | None = None  # vision-language engines only
    source_checkpoint: str | None = None  # where it was built from (for `kiln run --check-accuracy`)
    # {operator: modules whose import registers it} for operators outside torch's and kiln's namespaces
    op_modules: dict[str, tuple[str, ...]] = field(default_factory=dict)
    passes: dict[str, str] = field(default_factory=dict)  # {pass: "16 sites"}: the graph passes that changed it
    quantization: QuantizationFacts | None = None  # quantized engines only
    world: WorldFacts | None = None  # tensor-parallel engines only
    encoder_decoder: EncoderDecoderFacts | None = None  # encoder-decoder engines only
    kv_cache: KVCacheFacts | None = None  # engines with a narrow (FP8 / int8) KV cache only

    def to_json(self) -> str:
        data = {
            "kiln_version": self.kiln_version,
            "torch_version": self.torch_version,
            "transformers_version": self.transformers_version,
            "format_version": self.format_version,
            "device": self.device,
            "build": self.build.to_dict(),
            "model": {**self.model.__dict__, "eos_token_ids": list(self.model.eos_token_ids)},
            "compiled": self.compiled,
            "timings_s": self.timings_s,
            "op_modules": {op: list(modules) for op, modules in self.op_modules.items()},
            "passes": self.passes,
        }
        if self.multimodal is not None:
            data["multimodal"] = dict(self.multimodal.__dict__)
        if self.source_checkpoint is not None:
            data["source_checkpoint"] = self.source_checkpoint
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        if self.world is not None:
            data["world"] = dict(self.world.__dict__)
        if self.encoder_decoder is not None:
            data["encoder_decoder"] = self.encoder_decoder.to_dict()
        if self.kv_cache is not None:
            data["kv_cache"] = self.kv_cache.to_dict()
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        return cls(
            kiln_version=data["kiln_version"],
            torch_version=data["torch_version"],
            transformers_version=data["transformers_version"],
            format_version=data["format_version"],
            device=data["device"],
            build=BuildConfig.from_dict(data["build"]),
            model=ModelFacts.from_dict(data["model"]),
            compiled=data["compiled"],
            timings_s=data.get("timings_s", {}),
            multimodal=MultimodalFacts.from_dict(data["multimodal"]) if data.get("multimodal") else None,
            source_checkpoint=data.get("source_checkpoint"),
            op_modules={op: tuple(modules) for op, modules in data.get("op_modules", {}).items()},
            passes=data.get("passes", {}),  # engines built before kiln recorded them have none
            quantization=QuantizationFacts.from_dict(data["quantization"]) if data.get("quantization") else None,
            world=WorldFacts.from_dict(data["world"]) if data.get("world") else None,
            encoder_decoder=(
                EncoderDecoderFacts.from_dict(data["encoder_decoder"]) if data.get("encoder_decoder") else None
            ),
            kv_cache=KVCacheFacts.from_dict(data["kv_cache"]) if data.get("kv_cache") else None,
        )


def write_manifest(engine_dir: Path, manifest: Manifest) -> None:
    (engine_dir / MANIFEST).write_text(manifest.to_json() + "\n")


def read_manifest(engine_dir: Path) -> Manifest:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise KilnError(
            f"{engine_dir} is not a kiln engine directory: {MANIFEST} is missing (build one with `kiln build`)"
        )
    try:
        return Manifest.from_json(path.read_text())
    except (KeyError, TypeError, ValueError, KilnError) as exc:
        raise EngineMismatchError(
            f"{path} cannot be read by kiln {__version__} ({exc}); rebuild the engine with `kiln build`"
        ) from exc


def check_compatible(manifest: Manifest) -> torch.device:
    """The device to run the engine on; refuses engines built by another kiln/torch version or for another device.

    Every problem found is reported at once. The transformers version is recorded but not checked:
    the saved program does not use it.
    """
    problems = []
    if manifest.format_version != FORMAT_VERSION:
        problems.append(f"engine format {manifest.format_version}, this kiln reads format {FORMAT_VERSION}")
    if manifest.kiln_version != __version__:
        problems.append(f"built by kiln {manifest.kiln_version}, this is kiln {__version__}")
    if manifest.torch_version != torch.__version__:
        problems.append(f"built with torch {manifest.torch_version}, this is torch {torch.__version__}")
    built_for = manifest.device
    device = torch.device(built_for["type"])
    if built_for["type"] == "cuda":
        if not torch.cuda.is_available():
            problems.append("built for a CUDA GPU, and torch sees no GPU here")
        else:
            device = torch.device("cuda", torch.cuda.current_device())
            here = describe_device(device)
            if manifest.quantization is not None and manifest.quantization.weights == "fp8":
                problems.append(fp8_refusal(device) or "")
            if here["capability"] != built_for["capability"]:
                problems.append(
                    f"built for a GPU of compute capability {built_for['capability']} ({built_for['name']}), "
                    f"this GPU is {here['capability']} ({here['name']})"
                )
    elif built_for["type"] != "cpu":
        problems.append(f"built for device '{built_for['type']}', which kiln does not run")
    problems = [p for p in problems if p]
    if problems:
        raise EngineMismatchError(
            "This engine cannot be loaded here: "
            + "; ".join(problems)
            + ". Rebuild it with `kiln build` on this machine."
        )
    return device
