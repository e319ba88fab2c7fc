"""T5 and Flan-T5 (`T5ForConditionalGeneration`) on packed tokens, from the checkpoint's own modules.

T5 does not scale its attention scores; it adds a relative position bias instead (bidirectional
buckets in the encoder, unidirectional in the decoder's self-attention, none in cross-attention),
computed by the first layer's table and shared by every layer. Its feed-forward blocks (ReLU or
gated-GELU) and RMS norms are the checkpoint's modules, called as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.kernels.reference import relative_bucket
from kiln.models.encdec.base import (
    DecoderMetadata,
    EncoderBatch,
    EncoderDecoderFamily,
    PackedDecoder,
    PackedEncoder,
    heads,
    packed_self_attention,
)


def cross_key_values(cross: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A T5-shaped cross-attention's keys and values of the encoder output (T5's `EncDecAttention`)."""
    d = cross.key_value_proj_dim
    return heads(cross.k(h), d), heads(cross.v(h), d)


class T5Encoder(PackedEncoder):
    def __init__(self, model: Any) -> None:
        cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
        super().__init__(range(len(cross)), cross, cross_key_values)
        config = model.config
        self.embed = model.shared
        self.blocks = model.encoder.block
        self.norm = model.encoder.final_layer_norm
        self.bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        self.head_dim = int(config.d_kv)
        self.buckets = (int(config.relative_attention_num_buckets), int(config.relative_attention_max_distance))

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        d = self.head_dim
        h = batch.embed(self.embed)
        buckets = relative_bucket(batch.positions[None, :] - batch.positions[:, None], True, *self.buckets)
        bias = self.bias(buckets).permute(2, 0, 1)  # [H, T, T]
        for block in self.blocks:
            layer = block.layer[0]
            attn = layer.SelfAttention
            x = layer.layer_norm(h)
            q, k, v = heads(attn.q(x), d), heads(attn.k(x), d), heads(attn.v(x), d)
            out = packed_self_attention(q, k, v, batch.seq_ids, 1.0, bias)
            h = h + attn.o(out.flatten(1))
            h = block.layer[1](h)
        return self.norm(h)


class T5Decoder(PackedDecoder):
    def __init__(self, model: Any) -> None:
        super().__init__()
        config = model.config
        self.embed = model.shared
        self.blocks = model.decoder.block
        self.norm = model.decoder.final_layer_norm
        self.bias = model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias
        self.lm_head = model.lm_head
        self.head_dim = int(config.d_kv)
        self.max_distance = int(config.relative_attention_max_distance)
        scaled = getattr(config, "scale_decoder_outputs", None)
        scaled = config.tie_word_embeddings if scaled is None else scaled
        self.output_scale = float(config.d_model) ** -0.5 if scaled else None

    def step(
        self, meta: DecoderMetadata, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        d = self.head_dim
        h = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            layer = block.layer[0]
            attn = layer.SelfAttention
            x = layer.layer_norm(h)
            q, k, v = heads(attn.q(x), d), heads(attn.k(x), d), heads(attn.v(x), d)
            h = h + attn.o(meta.self_attention(q, k, v, i, 1.0, self.bias.weight, self.max_distance).flatten(1))
            layer = block.layer[1]
            cross = layer.EncDecAttention
            h = h + cross.o(meta.cross_attention(heads(cross.q(layer.layer_norm(h)), d), i, 1.0).flatten(1))
            h = block.layer[2](h)
        h = self.norm(h.index_select(0, logits_indices))
        if self.output_scale is not None:
            h = h * self.output_scale
        return self.lm_head(h)


class T5Family(EncoderDecoderFamily):
    architecture = "T5ForConditionalGeneration"
    notes = "relative position bias, unscaled attention, ReLU or gated-GELU feed-forward (Flan-T5)"

    def cache_shape(self, config: Any) -> tuple[int, int, int]:
        return int(config.num_decoder_layers), int(config.num_heads), int(config.d_kv)

    def encoder(self, model: nn.Module) -> nn.Module:
        return T5Encoder(model)

    def decoder(self, model: nn.Module) -> nn.Module:
        return T5Decoder(model)
