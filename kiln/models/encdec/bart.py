"""BART and mBART (`BartForConditionalGeneration`, `MBartForConditionalGeneration`) on packed tokens.

Learned positions are looked up at `position + 2` (the offset BART's checkpoints are trained
with), after the (optionally sqrt(d_model)-scaled) token embedding and before `layernorm_embedding`.
BART normalises after each residual add; mBART before each sub-layer, with a final norm per stack.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.encdec.base import (
    DecoderMetadata,
    EncoderBatch,
    EncoderDecoderFamily,
    PackedDecoder,
    PackedEncoder,
    heads,
    packed_self_attention,
)

POSITION_OFFSET = 2


def _feed_forward(layer: Any, h: torch.Tensor, pre_norm: bool) -> torch.Tensor:
    x = layer.final_layer_norm(h) if pre_norm else h
    h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
    return h if pre_norm else layer.final_layer_norm(h)


def cross_key_values(cross: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A BART-shaped cross-attention's keys and values of the encoder output (BART's `encoder_attn`)."""
    return heads(cross.k_proj(h), cross.head_dim), heads(cross.v_proj(h), cross.head_dim)


def _sublayer(norm: nn.Module, h: torch.Tensor, pre_norm: bool, attend: Any) -> torch.Tensor:
    """h + attend(x) with x = norm(h) first (mBART), or norm(h + attend(h)) (BART)."""
    if pre_norm:
        return h + attend(norm(h))
    return norm(h + attend(h))


class BartEncoder(PackedEncoder):
    def __init__(self, model: Any, pre_norm: bool) -> None:
        encoder, decoder = model.model.encoder, model.model.decoder
        super().__init__(range(len(decoder.layers)), [layer.encoder_attn for layer in decoder.layers], cross_key_values)
        self.embed = encoder.embed_tokens
        self.positions = encoder.embed_positions
        self.embed_norm = encoder.layernorm_embedding
        self.layers = encoder.layers
        self.norm = getattr(encoder, "layer_norm", None) if pre_norm else None
        self.pre_norm = pre_norm

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        h = self.embed_norm(batch.embed(self.embed) + self.positions.weight[batch.positions + POSITION_OFFSET])
        for layer in self.layers:
            attn = layer.self_attn
            d = attn.head_dim

            def attend(x: torch.Tensor, attn: Any = attn, d: int = d) -> torch.Tensor:
                q, k, v = heads(attn.q_proj(x), d), heads(attn.k_proj(x), d), heads(attn.v_proj(x), d)
                return attn.out_proj(packed_self_attention(q, k, v, batch.seq_ids, attn.scaling, None).flatten(1))

            h = _sublayer(layer.self_attn_layer_norm, h, self.pre_norm, attend)
            h = _feed_forward(layer, h, self.pre_norm)
        return h if self.norm is None else self.norm(h)


class BartDecoder(PackedDecoder):
    """The decoder stack `decoder` and its `lm_head` (plus BART's `final_logits_bias` when given)."""

    def __init__(self, decoder: Any, lm_head: nn.Module, logits_bias: torch.Tensor | None, pre_norm: bool) -> None:
        super().__init__()
        self.embed = decoder.embed_tokens
        self.positions = decoder.embed_positions
        self.embed_norm = decoder.layernorm_embedding
        self.layers = decoder.layers
        self.norm = getattr(decoder, "layer_norm", None) if pre_norm else None
        self.lm_head = lm_head
        bias = None if logits_bias is None else logits_bias.reshape(-1).detach().clone()
        self.register_buffer("logits_bias", bias, persistent=False)
        self.pre_norm = pre_norm

    def step(
        self, meta: DecoderMetadata, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        h = self.embed_norm(self.embed(input_ids) + self.positions.weight[positions + POSITION_OFFSET])
        for i, layer in enumerate(self.layers):
            attn, cross = layer.self_attn, layer.encoder_attn

            def attend(x: torch.Tensor, attn: Any = attn, i: int = i) -> torch.Tensor:
                d = attn.head_dim
                q, k, v = heads(attn.q_proj(x), d), heads(attn.k_proj(x), d), heads(attn.v_proj(x), d)
                return attn.out_proj(meta.self_attention(q, k, v, i, attn.scaling).flatten(1))

            def attend_encoder(x: torch.Tensor, cross: Any = cross, i: int = i) -> torch.Tensor:
                q = heads(cross.q_proj(x), cross.head_dim)
                return cross.out_proj(meta.cross_attention(q, i, cross.scaling).flatten(1))

            h = _sublayer(layer.self_attn_layer_norm, h, self.pre_norm, attend)
            h = _sublayer(layer.encoder_attn_layer_norm, h, self.pre_norm, attend_encoder)
            h = _feed_forward(layer, h, self.pre_norm)
        h = h.index_select(0, logits_indices)
        if self.norm is not None:
            h = self.norm(h)
        logits = self.lm_head(h)
        return logits if self.logits_bias is None else logits + self.logits_bias.to(logits.dtype)


class BartFamily(EncoderDecoderFamily):
    architecture = "BartForConditionalGeneration"
    notes = "learned positions with offset 2, post-norm layers, optional scaled embeddings"
    pre_norm = False

    def cache_shape(self, config: Any) -> tuple[int, int, int]:
        heads = int(config.decoder_attention_heads)
        return int(config.decoder_layers), heads, int(config.d_model) // heads

    def max_positions(self, config: Any) -> int | None:
        return int(config.max_position_embeddings)

    def encoder(self, model: nn.Module) -> nn.Module:
        return BartEncoder(model, self.pre_norm)

    def decoder(self, model: nn.Module) -> nn.Module:
        generation: Any = model
        return BartDecoder(generation.model.decoder, generation.lm_head, generation.final_logits_bias, self.pre_norm)


class MBartFamily(BartFamily):
    architecture = "MBartForConditionalGeneration"
    notes = "as BART, with pre-norm layers and a final norm per stack"
    pre_norm = True
