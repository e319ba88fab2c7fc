"""Pix2Struct's text decoder (`Pix2StructForConditionalGeneration`, Deplot) on packed tokens.

The decoder is T5-shaped: RMS norms before each sub-layer, unscaled attention with a unidirectional
relative position bias (the first layer's table, shared by every layer), cross-attention without a
bias, a gated feed-forward, and an untied head with no output scaling. Its encoder is the image
encoder (the vision program of `kiln.models.vlm.pix2struct`): the encoder program only stores each
decoder layer's cross keys/values of the image rows, which hold only the image's real patches (the
padding patches transformers masks out never reach the cache).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.encdec.base import DecoderMetadata, EncoderDecoderFamily, ImageRowsEncoder, PackedDecoder, heads


def _key_values(cross: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = cross.key_value_proj_dim
    return heads(cross.key(h), d), heads(cross.value(h), d)


class Pix2StructTextDecoder(PackedDecoder):
    def __init__(self, model: Any) -> None:
        super().__init__()
        decoder = model.decoder
        config = model.config.text_config
        self.embed = decoder.embed_tokens
        self.layers = decoder.layer
        self.norm = decoder.final_layer_norm
        self.lm_head = decoder.lm_head
        self.bias = decoder.layer[0].self_attention.attention.relative_attention_bias
        self.head_dim = int(config.d_kv)
        self.max_distance = int(config.relative_attention_max_distance)

    def step(
        self, meta: DecoderMetadata, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        d = self.head_dim
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            sub = layer.self_attention
            attn = sub.attention
            x = sub.layer_norm(h)
            q, k, v = heads(attn.query(x), d), heads(attn.key(x), d), heads(attn.value(x), d)
            out = meta.self_attention(q, k, v, i, 1.0, self.bias.weight, self.max_distance)
            h = h + attn.output(out.flatten(1))
            sub = layer.encoder_decoder_attention
            cross = sub.attention
            q = heads(cross.query(sub.layer_norm(h)), d)
            h = h + cross.output(meta.cross_attention(q, i, 1.0).flatten(1))
            h = layer.mlp(h)
        return self.lm_head(self.norm(h.index_select(0, logits_indices)))


class Pix2StructFamily(EncoderDecoderFamily):
    architecture = "Pix2StructForConditionalGeneration"
    notes = "image patch rows -> T5-style decoder with relative position bias (Pix2Struct, Deplot)"

    def cache_shape(self, config: Any) -> tuple[int, int, int]:
        return int(config.num_layers), int(config.num_heads), int(config.d_kv)

    def encoder(self, model: nn.Module) -> nn.Module:
        """Stores each decoder layer's cross keys/values of the image rows."""
        generation: Any = model
        cross = [layer.encoder_decoder_attention.attention for layer in generation.decoder.layer]
        return ImageRowsEncoder(range(len(cross)), cross, _key_values)

    def decoder(self, model: nn.Module) -> nn.Module:
        return Pix2StructTextDecoder(model)
