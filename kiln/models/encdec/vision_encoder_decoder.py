"""`VisionEncoderDecoderModel` with a BART or mBART decoder (Nougat, Donut): an image encoder's output rows
are the encoder output whose cross-attention keys/values the encoder program stores.

The image encoder itself (Donut-Swin, with `enc_to_dec_proj` when the widths differ) is the vision
program of `kiln.models.vlm.vision_encoder_decoder`; every encoder "token" of a request is an image row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.encdec.bart import BartDecoder, BartFamily, store_cross_kv


class ImageRowsEncoder(nn.Module):
    """Stores each decoder layer's cross keys/values of the image rows (`mm_embeds` by `mm_index`)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.cross = nn.ModuleList(layer.encoder_attn for layer in model.decoder.model.decoder.layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_ids: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: torch.Tensor,
        mm_embeds: torch.Tensor,
        mm_index: torch.Tensor,
    ) -> torch.Tensor:
        h = mm_embeds.index_select(0, mm_index.clamp(min=0)).to(kv_cache.dtype)
        store_cross_kv(self.cross, h, kv_cache, slot_mapping)
        return h


class VisionEncoderDecoderFamily(BartFamily):
    architecture = "VisionEncoderDecoderModel"
    notes = "image encoder rows -> BART/mBART decoder cross-attention (Nougat, Donut)"

    def prefix_config(self, model_config: Any, text_config: Any) -> Any:
        return model_config  # decoder_start_token_id lives on the top-level config

    def encoder(self, model: nn.Module) -> nn.Module:
        return ImageRowsEncoder(model)

    def decoder(self, model: nn.Module) -> nn.Module:
        causal_lm: Any = model.decoder
        pre_norm = causal_lm.config.model_type == "mbart"
        return BartDecoder(causal_lm.model.decoder, causal_lm.lm_head, None, pre_norm)
