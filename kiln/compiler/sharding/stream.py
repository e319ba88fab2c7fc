"""One rank's model with weights read straight from the checkpoint's safetensors slices: the model is
made with its parameters on the meta device (buffers such as rotary tables are computed for real), split
(`shard_model`), and each parameter is then read as its slice; no rank ever holds the full weights."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from kiln.compiler.sharding.plans import plan_for
from kiln.compiler.sharding.quantize import row_parallel_int8
from kiln.compiler.sharding.shard import Slice, shard_model
from kiln.engine.world import WORLD_GROUP
from kiln.errors import KilnError
from kiln.models.loader import ATTENTION_NAME, LoadedCheckpoint, check_checkpoint_dir, load_config
from kiln.models.registry import recipe_for
from kiln.models.rope import freeze_dynamic_rope


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules made inside register their parameters on the meta device (buffers stay where they are made)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _key_files(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {key: path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def cut(source: Any, piece: Slice, dtype: torch.dtype) -> torch.Tensor:
    """`piece` of `source` (a tensor, or a safetensors slice handle), in `dtype`, zero-padded to its size."""
    if piece.dim is None:
        return source[:].to(dtype).contiguous()
    index = (slice(None),) * piece.dim + (slice(piece.start, piece.stop),)
    tensor = source[index].to(dtype).contiguous()
    missing = piece.size - (piece.stop - piece.start)
    if missing:
        pad = list(tensor.shape)
        pad[piece.dim] = missing
        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=piece.dim)
    return tensor


def _read(files: dict[str, Path], piece: Slice, fallback: str | None, dtype: torch.dtype) -> torch.Tensor:
    key = piece.key if piece.key in files else fallback
    if key is None or key not in files:
        raise KilnError(f"the checkpoint has no tensor {piece.key}")
    with safe_open(str(files[key]), "pt") as f:
        return cut(f.get_slice(key), piece, dtype)


def fill(model: nn.Module, slices: dict[str, Slice], read: Callable[[str, Slice], torch.Tensor]) -> None:
    """Give each parameter of a sharded model `read(name, its slice)`; none may be left on the meta device."""
    for name, piece in slices.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = nn.Parameter(read(name, piece), requires_grad=False)
    _check_loaded(model)


def load_shard(
    path: str | Path, dtype: torch.dtype, rank: int, tp_size: int, *, int8: bool = False, group: str = WORLD_GROUP
) -> LoadedCheckpoint:
    """Rank `rank`'s shard of the checkpoint at `path` (CPU), with its tokenizer and generation config;
    `int8`: with its row-parallel linears quantized on whole-row scales (`quantized`, for the build's pass)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from kiln.models.attention_interface import register_attention

    path = Path(path)
    check_checkpoint_dir(path)
    config = load_config(path)
    recipe = recipe_for(getattr(config, "architectures", None), trust_remote_code=False, has_code=False)
    plan = plan_for(recipe.architecture)
    register_attention()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME, dtype=dtype)
    text = config.get_text_config()
    slices = shard_model(model, plan, rank, tp_size, text, group)
    files = _key_files(path)
    tied = f"{plan.embedding}.weight"
    fill(model, slices, lambda name, piece: _read(files, piece, tied if name == f"{plan.head}.weight" else None, dtype))
    quantized = None
    if int8:
        rows = {n: model.get_parameter(n) for n, p in slices.items() if p.dim == 1}
        quantized = row_parallel_int8(rows, slices, tp_size, lambda piece: _read(files, piece, None, dtype))
    model.eval()
    freeze_dynamic_rope(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        generation_config: Any = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        generation_config = None
    return LoadedCheckpoint(model, config, tokenizer, recipe, generation_config, quantized)


def _check_loaded(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise KilnError(f"the sharded model has tensors the checkpoint did not fill: {', '.join(left[:5])}")
