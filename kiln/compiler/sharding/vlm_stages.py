"""The first pipeline stage of a vision-language engine's language model: the LLM program's signature
(the image rows spliced into the embeddings, as `capture_mm.PackedMultimodalLM` does), hidden states out.
Later stages are a text model's (`stages.stage_spec`): hidden states in, the same positions."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from kiln.compiler.capture_mm import llm_spec, splice_images
from kiln.compiler.model_facts import resolve_device
from kiln.compiler.program_spec import CacheShape, ProgramSpec
from kiln.config import BuildConfig, torch_dtype


class FirstMultimodalStage(nn.Module):
    """Embeds the packed tokens, splices in the image rows and runs the stage's layers."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        logits_indices: torch.Tensor,
        kv_cache: torch.Tensor,
        mm_embeds: torch.Tensor,
        mm_index: torch.Tensor,
    ) -> torch.Tensor:
        embeds = splice_images(self.model, input_ids, mm_embeds, mm_index)
        out = self.model.model(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]


def first_stage_spec(
    model: nn.Module, shape: CacheShape, config: BuildConfig, hidden: int, architecture: str
) -> ProgramSpec:
    """The LLM program's spec (inputs, dynamic shapes, check inputs) around the first stage's module."""
    spec = llm_spec(
        model,
        shape,
        hidden=hidden,
        position_rows=1,
        bidirectional=False,
        dtype=torch_dtype(config.dtype),
        device=resolve_device(config.device),
        block_size=config.tokens_per_block,
        max_num_tokens=config.max_num_tokens,
        max_batch_size=config.max_batch_size,
        architecture=architecture,
    )
    return dataclasses.replace(spec, module=FirstMultimodalStage(model).eval(), what=f"{architecture} stage 0")
