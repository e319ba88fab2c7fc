"""Kosmos-2 (`Kosmos2ForConditionalGeneration`): CLIP-style tower, then latent queries cross-attend to its features.

The processor writes `<image>`, `latent_query_num` placeholder tokens and `</image>` at the start of
a prompt (so one image per prompt) and marks the placeholders in `image_embeds_position_mask`; the
placeholders are distinct token ids, so the mask, not a token id, says which tokens take image
rows. Grounding tokens (`<grounding>`, `<phrase>`, `<patch_index_NNNN>`...) are ordinary text. A text-only
prompt is tokenized as the processor writes it: `<s>` first, no `</s>`.

The language model's sinusoidal positions start after its padding index (fairseq style), so the
LLM program shifts kiln's 0-based positions by `pad_token_id + 1`. The projection's cross-attention
is a text-model attention module; the vision program computes it with SDPA itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from kiln.models.vlm.base import VisionLanguageFamily, detach_modules

MASK_KEY = "image_embeds_position_mask"


class Kosmos2Vision(nn.Module):
    """pixel_values [N, 3, H, W] -> [N, latent_query_num, embed_dim], as `get_image_features`."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.projection = model.image_to_text_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        hidden = nn.functional.normalize(self.vision_model.model.post_layernorm(hidden), dim=-1)
        proj: Any = self.projection
        hidden = proj.dense(hidden)
        queries = proj.latent_query.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        keys_values = torch.cat([hidden, queries], dim=1)
        attn = proj.x_attn
        n, heads = hidden.shape[0], int(attn.num_heads)
        q = attn.q_proj(queries).view(n, queries.shape[1], heads, -1).transpose(1, 2)
        k = attn.k_proj(keys_values).view(n, keys_values.shape[1], heads, -1).transpose(1, 2)
        v = attn.v_proj(keys_values).view(n, keys_values.shape[1], heads, -1).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        out = out.transpose(1, 2).reshape(n, queries.shape[1], -1)
        if attn.inner_attn_ln is not None:
            out = attn.inner_attn_ln(out)
        return attn.out_proj(out)


class ShiftedPositions(nn.Module):
    """The text model called with positions + `offset` (its position table's first real row)."""

    def __init__(self, text_model: nn.Module, offset: int) -> None:
        super().__init__()
        self.text_model = text_model
        self.offset = offset

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()  # type: ignore[operator, no-any-return]

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.text_model(inputs_embeds=inputs_embeds, position_ids=position_ids + self.offset, **kwargs)

    def generate(self, **kwargs: Any) -> Any:
        """transformers' own text generation (it places positions itself): the reference for text prompts."""
        return self.text_model.generate(**kwargs)  # type: ignore[operator]


class Kosmos2(VisionLanguageFamily):
    architecture = "Kosmos2ForConditionalGeneration"
    notes = "latent queries over a CLIP-style tower, placed by the processor's position mask; grounding tokens as text"
    max_images_per_prompt: ClassVar[int | None] = 1

    def image_token_id(self, config: Any) -> int:
        return -1  # the placeholders are many ids: `image_mask` reads the processor's mask instead

    def text_config(self, config: Any) -> Any:
        return config.text_config

    def vision_module(self, model: nn.Module) -> nn.Module:
        return Kosmos2Vision(model)

    def detach_vision(self, model: nn.Module) -> None:
        detach_modules(model, "vision_model", "image_to_text_projection")

    def text_model(self, model: nn.Module) -> nn.Module:
        text: Any = model.text_model
        return ShiftedPositions(text, int(text.config.pad_token_id) + 1)

    def tokens_per_image(self, config: Any) -> int:
        return int(config.latent_query_num)

    def engine_tokenizer(self, tokenizer: Any) -> Any:
        """Text prompts as `Kosmos2Processor` writes them: `<s>` first and no `</s>` at the end (the checkpoint's
        XLM-R tokenizer appends one); saved as transformers' generic fast tokenizer so the rule stays."""
        from tokenizers import Tokenizer, processors
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        bos = str(tokenizer.bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, int(tokenizer.bos_token_id))]
        )
        named = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        out = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
        out.chat_template = getattr(tokenizer, "chat_template", None)
        return out

    def prompt_image_token(self, processor: Any) -> str | None:
        return None

    def image_mask(self, ids: torch.Tensor, processed: Mapping[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
        mask = processed.get(MASK_KEY)
        if mask is None:
            return torch.zeros(ids.shape, dtype=torch.bool)
        return torch.as_tensor(mask).reshape(-1).to(torch.bool)
