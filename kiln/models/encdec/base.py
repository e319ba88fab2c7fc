"""What kiln needs to know about one encoder-decoder family, and the attention its packed modules share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class EncoderBatch:
    """An encoder program's packed tokens (`seq_ids [T]`: each token's sequence), and a vision-language model's
    image rows: `mm_embeds [M, hidden]`, `mm_index [T]` (the row of each image token, -1 for text)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    seq_ids: torch.Tensor
    mm_embeds: torch.Tensor | None = None
    mm_index: torch.Tensor | None = None

    def embed(self, embed: nn.Module) -> torch.Tensor:
        """The token embeddings, with the rows of image tokens (`mm_index >= 0`) taken from `mm_embeds`
        (a vision-language model's encoder input, as transformers' `masked_scatter` places them)."""
        if self.mm_embeds is None or self.mm_index is None:
            return embed(self.input_ids)
        is_image = self.mm_index >= 0
        h = embed(self.input_ids.masked_fill(is_image, 0))
        rows = self.mm_embeds.index_select(0, self.mm_index.clamp(min=0)).to(h.dtype)
        return torch.where(is_image[:, None], rows, h)


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[T, H * D] -> [T, H, D]."""
    return x.view(x.shape[0], -1, head_dim)


# A cross-attention module's keys and values [T, H, D] of the encoder output [T, hidden]
KeyValues = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def store_cross_kv(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    h: torch.Tensor,
    layers: Sequence[int],
    cross: nn.ModuleList,
    key_values: KeyValues,
) -> None:
    """Store the cross-attention keys/values of the encoder output `h` in each decoder layer `layers[i]`
    (`cross[i]` projects them)."""
    for layer, module in zip(layers, cross):
        keys, values = key_values(module, h)
        torch.ops.kiln.store_kv(kv_cache, keys, values, slot_mapping, layer)


class PackedEncoder(nn.Module):
    """An encoder program: `ENCODER_INPUT_NAMES` (then a vision-language model's image rows `mm_embeds`, `mm_index`)
    -> the encoder output [T, hidden], whose keys/values `cross[i]` stores in decoder layer `layers[i]`; a family's
    `encode` runs its encoder."""

    def __init__(self, layers: Sequence[int], cross: Sequence[nn.Module], key_values: KeyValues) -> None:
        super().__init__()
        self.cross_layers = [int(i) for i in layers]
        self.cross = nn.ModuleList(cross)
        self.key_values = key_values

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_ids: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: torch.Tensor,
        mm_embeds: torch.Tensor | None = None,
        mm_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.encode(EncoderBatch(input_ids, positions, seq_ids, mm_embeds, mm_index)).to(kv_cache.dtype)
        store_cross_kv(kv_cache, slot_mapping, h, self.cross_layers, self.cross, self.key_values)
        return h

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        raise NotImplementedError


class ImageRowsEncoder(PackedEncoder):
    """The encoder of a family whose encoder output is a vision program's rows (`mm_embeds` by `mm_index`)."""

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        assert batch.mm_embeds is not None and batch.mm_index is not None, "an image-rows encoder takes image rows"
        return batch.mm_embeds.index_select(0, batch.mm_index.clamp(min=0))


@dataclass(frozen=True)
class DecoderMetadata:
    """The decoder program's paged-attention inputs, as its layers pass them to `kiln::span_attention`;
    `cross_spans [T, 2]`: each token's image rows, for a family whose decoder reads the prompt (Mllama)."""

    kv_cache: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    encoder_lens: torch.Tensor
    cross_spans: torch.Tensor | None = None

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


class PackedDecoder(nn.Module):
    """A decoder program: `DECODER_INPUT_NAMES` (then `cross_spans` where the decoder reads the prompt) ->
    the logits rows [N, vocab]; a family's `step` runs its layers."""

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
        encoder_lens: torch.Tensor,
        cross_spans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta = DecoderMetadata(
            kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, encoder_lens, cross_spans
        )
        return self.step(meta, input_ids, positions, logits_indices)

    def step(
        self, meta: DecoderMetadata, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


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
