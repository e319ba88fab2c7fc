"""Mllama (Llama 3.2 Vision, `MllamaForConditionalGeneration`) as an encoder-decoder engine: the image rows are
the encoder input, the prompt's text runs in the decoder.

The encoder program stores, for each cross-attention layer of the text model (`cross_attention_layers`),
the keys (after `k_norm`) and values of a request's image rows at its first cache positions (every image's
real tiles first, then the padding tiles: `kiln.models.vlm.mllama`). The decoder is the text model: its
self-attention layers attend causally over the text's own keys (the cache positions after the image rows),
its cross-attention layers over the image rows. Each decoder token carries `cross_spans` (begin, end):
`end > 0`, it attends to the rows [begin, end) (the real tiles of the images it reads); `end < 0`, a token
before the first image: transformers leaves such a row unmasked (it attends to all -end rows, padding
tiles too) and zeroes its cross-attention feed-forward; `end == 0`, a request without an image, whose
tokens skip the cross-attention layers as transformers does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.models.encdec.base import DecoderMetadata, EncoderDecoderFamily, ImageRowsEncoder, PackedDecoder, heads


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _text_model(model: Any) -> Any:
    return model.model.language_model


def _key_values(cross: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = cross.head_dim
    return cross.k_norm(heads(cross.k_proj(h), d)), heads(cross.v_proj(h), d)


class MllamaDecoder(PackedDecoder):
    def __init__(self, model: Any) -> None:
        super().__init__()
        text = _text_model(model)
        self.embed = text.embed_tokens
        self.layers = text.layers
        self.norm = text.norm
        self.rotary = text.rotary_emb
        self.lm_head = model.lm_head
        self.cross_layers = frozenset(int(i) for i in text.cross_attention_layers)

    def step(
        self, meta: DecoderMetadata, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        assert meta.cross_spans is not None, "the Mllama decoder program takes cross_spans"
        h = self.embed(input_ids)
        cos, sin = self.rotary(h[None], positions[None])
        cos, sin = cos[0, :, None, :].to(h.dtype), sin[0, :, None, :].to(h.dtype)
        begin, end = meta.cross_spans[:, 0], meta.cross_spans[:, 1]
        has_image = (end != 0)[:, None]
        attends = end > 0
        for i, layer in enumerate(self.layers):
            if i in self.cross_layers:
                cross = layer.cross_attn
                d = cross.head_dim
                q = cross.q_norm(heads(cross.q_proj(layer.input_layernorm(h)), d))
                out = meta.cross_attention(q, i, cross.scaling, begin, end.abs())
                x = h + layer.cross_attn_attn_gate.tanh() * cross.o_proj(out.flatten(1))
                mlp = layer.mlp(layer.post_attention_layernorm(x)) * attends[:, None].to(x.dtype)
                x = x + layer.cross_attn_mlp_gate.tanh() * mlp
                h = torch.where(has_image, x, h)
                continue
            attn = layer.self_attn
            d = attn.head_dim
            x = layer.input_layernorm(h)
            q = _rotate(heads(attn.q_proj(x), d), cos, sin)
            k = _rotate(heads(attn.k_proj(x), d), cos, sin)
            out = meta.self_attention(q, k, heads(attn.v_proj(x), d), i, attn.scaling)
            h = h + attn.o_proj(out.flatten(1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.norm(h.index_select(0, logits_indices)))


class MllamaFamily(EncoderDecoderFamily):
    architecture = "MllamaForConditionalGeneration"
    notes = "vision rows -> cross-attention layers interleaved in a Llama decoder (Llama 3.2 Vision)"
    decoder_prompt = True

    def cache_shape(self, config: Any) -> tuple[int, int, int]:
        heads_ = int(config.num_attention_heads)
        return int(config.num_hidden_layers), int(config.num_key_value_heads), int(config.hidden_size) // heads_

    def encoder(self, model: nn.Module) -> nn.Module:
        """Stores each cross-attention layer's keys (after `k_norm`) and values of the image rows."""
        text = _text_model(model)
        layers = [int(i) for i in text.cross_attention_layers]
        return ImageRowsEncoder(layers, [text.layers[i].cross_attn for i in layers], _key_values)

    def decoder(self, model: nn.Module) -> nn.Module:
        return MllamaDecoder(model)
