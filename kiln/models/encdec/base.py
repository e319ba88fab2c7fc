"""What kiln needs to know about one encoder-decoder family, and the attention its packed modules share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kiln.kernels  # noqa: F401  (registers kiln::span_attention, kiln::store_kv)

ENCODER_INPUT_NAMES = ("input_ids", "positions", "seq_ids", "slot_mapping", "kv_cache")
DECODER_INPUT_NAMES = (
    "input_ids",  # [T] decoder tokens
    "positions",  # [T] decoder positions (0 = the decoder start token)
    "slot_mapping",  # [T] cache slots of those tokens (after the sequence's encoder positions)
    "block_tables",
    "seq_lens",  # [B] cache length after the step: encoder length + decoder tokens
    "query_start_loc",
    "logits_indices",
    "kv_cache",
    "encoder_lens",  # [B] each sequence's encoder length: its cross keys are cache positions [0, it)
)


def packed_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_ids: torch.Tensor, scale: float, bias: torch.Tensor | None
) -> torch.Tensor:
    """Bidirectional attention of packed tokens [T, H, D] within their own sequence (`seq_ids [T]`);
    `bias [H, T, T]` is added to the scores (T5's relative positions)."""
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if bias is not None:
        scores = scores + bias.float()
    same = seq_ids[:, None] == seq_ids[None, :]
    scores = scores.masked_fill(~same[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def embed_tokens(
    embed: nn.Module, input_ids: torch.Tensor, mm_embeds: torch.Tensor | None, mm_index: torch.Tensor | None
) -> torch.Tensor:
    """The token embeddings, with the rows of image tokens (`mm_index >= 0`) taken from `mm_embeds`
    (a vision-language model's encoder input, as transformers' `masked_scatter` places them)."""
    if mm_embeds is None or mm_index is None:
        return embed(input_ids)
    is_image = mm_index >= 0
    h = embed(input_ids.masked_fill(is_image, 0))
    rows = mm_embeds.index_select(0, mm_index.clamp(min=0)).to(h.dtype)
    return torch.where(is_image[:, None], rows, h)


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, H * D] -> [T, H, D]."""
    return x.view(x.shape[0], -1, head_dim)


@dataclass(frozen=True)
class DecoderMetadata:
    """The decoder program's paged-attention inputs, as its layers pass them to `kiln::span_attention`."""

    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    encoder_lens: torch.Tensor

    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
        bias: torch.Tensor | None = None, max_distance: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """Causal attention over the decoder's own keys (cache positions after the encoder's)."""
        return torch.ops.kiln.span_attention(
            q, k, v, self.kv_cache, self.slot_mapping, self.block_tables, self.seq_lens, self.query_start_loc,
            self.encoder_lens, self.seq_lens, layer, scale, True, bias, max_distance,
        )  # fmt: skip

    def cross_attention(
        self, q: torch.Tensor, layer: int, scale: float,
        query_begin: torch.Tensor | None = None, query_end: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention over the encoder output's keys, stored by the encoder program; `query_begin`/`query_end [T]`:
        each query's own part of them (a query with none gets zeros)."""
        return torch.ops.kiln.span_attention(
            q, None, None, self.kv_cache, self.slot_mapping, self.block_tables, self.seq_lens, self.query_start_loc,
            torch.zeros_like(self.encoder_lens), self.encoder_lens, layer, scale, False, None, 0,
            query_begin, query_end,
        )  # fmt: skip


class EncoderDecoderFamily:
    """One family (registered in `kiln.models.encdec.FAMILIES` by HF architecture name)."""

    architecture = ""
    notes = ""
    # True: the prompt's text runs in the decoder and the encoder input is the image rows alone (Mllama); the
    # decoder program then also takes `cross_spans [T, 2]` and the decoder starts from no start tokens.
    decoder_prompt = False

    def cache_shape(self, config: Any) -> tuple[int, int, int]:
        """(decoder layers, heads, head_dim): the cache holds self and cross keys of each decoder layer."""
        raise NotImplementedError

    def max_positions(self, config: Any) -> int | None:
        """The longest encoder input or decoder sequence its position embeddings allow (None: no limit)."""
        return None

    def prefix_config(self, model_config: Any, text_config: Any) -> Any:
        """The config that names the decoder's start tokens (a vision-language model's language model's)."""
        return text_config

    def encoder(self, model: nn.Module) -> nn.Module:
        """A module over `ENCODER_INPUT_NAMES`: runs the encoder, stores every decoder layer's cross keys/values."""
        raise NotImplementedError

    def decoder(self, model: nn.Module) -> nn.Module:
        """A module over `DECODER_INPUT_NAMES` returning the logits rows [N, vocab]."""
        raise NotImplementedError


def decoder_prefix(config: Any, generation_config: Any) -> tuple[int, ...]:
    """The tokens the decoder starts from: `decoder_start_token_id`, then `forced_bos_token_id` when set
    (what transformers' generate forces as the first generated token)."""

    def pick(name: str) -> Any:
        value = getattr(generation_config, name, None) if generation_config is not None else None
        return value if value is not None else getattr(config, name, None)

    start = pick("decoder_start_token_id")
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if not isinstance(start, int):
        from kiln.errors import UnsupportedModelError

        raise UnsupportedModelError("the checkpoint names no decoder_start_token_id, so kiln cannot start its decoder")
    forced = pick("forced_bos_token_id")
    return (start,) if forced is None else (start, int(forced))
