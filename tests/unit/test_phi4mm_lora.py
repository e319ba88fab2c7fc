"""Phi-4-multimodal's vision LoRA merge (`kiln.models.vlm.phi4mm_lora`): the merged weight, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kiln.errors import UnsupportedModelError
from kiln.models.vlm.phi4mm_lora import merge_vision_lora


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.proj = nn.Linear(6, 5)
        self.model.norm = nn.LayerNorm(5)


def write_adapter(path, config, tensors):
    folder = path / "vision-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_adds_scaled_product(tmp_path, rslora):
    torch.manual_seed(0)
    model, a, b = Tiny(), torch.randn(3, 6), torch.randn(5, 3)
    before = model.model.proj.weight.detach().clone()
    config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": rslora}
    write_adapter(tmp_path, config, {"base_model.model.model.proj.lora_A.weight": a, "model.proj.lora_B.weight": b})
    assert merge_vision_lora(model, tmp_path) == 1
    scale = 6 / math.sqrt(3) if rslora else 2.0
    assert torch.allclose(model.model.proj.weight, before + scale * b @ a, atol=1e-6)


def test_no_adapter_changes_nothing(tmp_path):
    model = Tiny()
    before = model.model.proj.weight.detach().clone()
    assert merge_vision_lora(model, tmp_path) == 0 and torch.equal(model.model.proj.weight, before)


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        ({"peft_type": "LORA", "r": 3, "use_dora": True}, {}, "use_dora"),
        ({"peft_type": "IA3", "r": 3}, {}, "LoRA only"),
        ({"peft_type": "LORA", "r": 3}, {"model.proj.lora_A.weight": torch.zeros(3, 6)}, "only one of"),
        (
            {"peft_type": "LORA", "r": 3},
            {"model.norm.lora_A.weight": torch.zeros(3, 5), "model.norm.lora_B.weight": torch.zeros(5, 3)},
            "not a linear",
        ),
    ],
)
def test_refuses_what_it_cannot_merge(tmp_path, config, tensors, message):
    write_adapter(tmp_path, config, tensors or {"x.lora_A.weight": torch.zeros(1), "x.lora_B.weight": torch.zeros(1)})
    with pytest.raises(UnsupportedModelError, match=message):
        merge_vision_lora(Tiny(), tmp_path)


def test_refuses_weights_with_unmerged_lora(tmp_path):
    save_file({"model.proj.base_layer.weight": torch.zeros(5, 6)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="unmerged LoRA"):
        merge_vision_lora(Tiny(), tmp_path)
