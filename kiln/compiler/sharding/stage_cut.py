"""A pipeline stage cut from a model: its layers only, numbered from 0 (with the quantized linears renamed
to match). The layers are those of the language model's body (`model` for a text model, the language
model under a vision-language wrapper: `model.language_model` for LLaVA)."""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from torch import nn

from kiln.compiler.sharding.plans import PLANS
from kiln.models.quantized_checkpoint import QuantizedLinears


def body_path(architecture: str) -> str:
    """The module holding `layers`, `norm` and `embed_tokens` (the embedding's owner in the shard plan)."""
    plan = PLANS.get(architecture)
    return plan.embedding.rpartition(".")[0] if plan is not None else "model"


def keep_layers(model: nn.Module, start: int, stop: int, *, first: bool, last: bool, body: str = "model") -> None:
    """Cut `model` to layers [start, stop), numbered from 0; a stage before the last drops the norm and head."""
    owner: Any = model.get_submodule(body)
    layers = list(owner.layers)[start:stop]
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    owner.layers = nn.ModuleList(layers)
    if not last:
        owner.norm = nn.Identity()
        setattr(model, "lm_head", nn.Identity())  # noqa: B010
    if not first:
        owner.embed_tokens = nn.Identity()


def stage_copy(model: nn.Module, start: int, stop: int, *, first: bool, last: bool, body: str) -> nn.Module:
    """A copy of `model` cut to one stage; its parameters share the storage of `model`'s (left whole)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()}
    staged = copy.deepcopy(model, memo)
    keep_layers(staged, start, stop, first=first, last=last, body=body)
    return staged


def stage_linears(quantized: QuantizedLinears | None, start: int, stop: int, body: str) -> QuantizedLinears | None:
    """The quantized linears of layers [start, stop) of `body`, renamed as `keep_layers` numbers them (the
    quantization pass finds a weight by its name); the others (the head's, say) are kept as they are."""
    if quantized is None:
        return None
    pattern = re.compile(rf"^({re.escape(body)}\.layers\.)(\d+)(\..*)$")
    weights = {}
    for key, weight in quantized.weights.items():
        match = pattern.match(key)
        if match is None:
            weights[key] = weight
        elif start <= int(match.group(2)) < stop:
            weights[f"{match.group(1)}{int(match.group(2)) - start}{match.group(3)}"] = weight
    return dataclasses.replace(quantized, weights=weights)


_LAYER_NUMBER = re.compile(r"(^|[._])layers([._])(\d+)(?=[._])")


def checkpoint_layer_name(name: str, start: int) -> str:
    """A stage's program parameter name with its layer number put back in the checkpoint's numbering (the
    stage's layers are numbered from 0, the first of them is the checkpoint's layer `start`)."""
    if start == 0:
        return name
    return _LAYER_NUMBER.sub(lambda m: f"{m.group(1)}layers{m.group(2)}{int(m.group(3)) + start}", name, count=1)
