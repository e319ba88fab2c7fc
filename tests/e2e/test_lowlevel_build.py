"""The low-level builders leave the caller's modules as they were: device, dtype, attention implementation."""

from __future__ import annotations

import threading

import pytest
import torch
from e2e_helpers import DEMO
from torch import nn

from kiln import InputSpec, KilnError, build_llm_engine, build_multimodal_engine


class Patches(nn.Module):
    """A stand-in vision wrapper: 4x4 images -> 4 feature rows of the language model's width."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(12, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows = pixel_values.reshape(pixel_values.shape[0], 3, 4, 4).permute(0, 2, 3, 1).reshape(-1, 4, 12)
        return self.proj(rows)


def test_building_leaves_the_callers_modules_as_they_were(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    lm = AutoModelForCausalLM.from_pretrained(DEMO, attn_implementation="eager").eval()
    vision = Patches(lm.config.hidden_size).eval()
    weights = {name: p.detach().clone() for name, p in lm.named_parameters()}
    options = dict(dtype="bfloat16", device="cpu", compile=False, max_batch_size=2, max_seq_len=64)
    out = build_llm_engine(
        lm, tmp_path / "e", tokenizer=tokenizer, image_token_id=0, max_prompt_embedding_table_size=8, **options
    )
    build_multimodal_engine(vision, out, input_specs=[InputSpec(shape=(-1, 3, 4, 4))], compile=False)
    assert lm.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in lm.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in lm.named_parameters())
    assert all(p.dtype == torch.float32 for p in vision.parameters())
    assert (out / "manifest.json").is_file()


def test_a_module_that_cannot_be_copied_is_a_clear_error(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(DEMO).eval()
    lm.lock = threading.Lock()  # cannot be deep-copied
    with pytest.raises(KilnError, match=r"language_model \(\w+\) cannot be copied for the build"):
        build_llm_engine(
            lm, tmp_path / "e", tokenizer=AutoTokenizer.from_pretrained(DEMO), image_token_id=0,
            max_prompt_embedding_table_size=8, device="cpu", compile=False,
        )  # fmt: skip
    assert not (tmp_path / "e").exists()  # refused before anything was written
