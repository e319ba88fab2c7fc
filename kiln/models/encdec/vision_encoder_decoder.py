"""`VisionEncoderDecoderModel` with a BART or mBART decoder (Nougat, Donut): an image encoder's output rows
are the encoder output whose cross-attention keys/values the encoder program stores.

The image encoder itself (Donut-Swin, with `enc_to_dec_proj` when the widths differ) is the vision
program of `kiln.models.vlm.vision_encoder_decoder`; every encoder "token" of a request is an image row.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kiln.models.encdec.bart import BartDecoder, BartFamily, cross_key_values
from kiln.models.encdec.base import ImageRowsEncoder


class VisionEncoderDecoderFamily(BartFamily):
    architecture = "VisionEncoderDecoderModel"
    notes = "image encoder rows -> BART/mBART decoder cross-attention (Nougat, Donut)"

    def prefix_config(self, model_config: Any, text_config: Any) -> Any:
        return model_config  # decoder_start_token_id lives on the top-level config

    def encoder(self, model: nn.Module) -> nn.Module:
        """Stores each decoder layer's cross keys/values of the image rows."""
        generation: Any = model
        layers = generation.decoder.model.decoder.layers
        return ImageRowsEncoder(range(len(layers)), [layer.encoder_attn for layer in layers], cross_key_values)

    def decoder(self, model: nn.Module) -> nn.Module:
        causal_lm: Any = model.decoder
        pre_norm = causal_lm.config.model_type == "mbart"
        return BartDecoder(causal_lm.model.decoder, causal_lm.lm_head, None, pre_norm)
