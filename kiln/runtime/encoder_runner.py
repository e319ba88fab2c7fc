"""The runtime of an encoder-decoder engine: each request's encoder input, the encoder program and the decoder step.

A request is one `Sequence` whose tokens are its encoder input (E tokens), then the decoder's prefix
(`decoder_start_token_id`, and a forced BOS where the model forces one), then the generated tokens.
Its cache blocks follow the same positions: positions [0, E) hold every decoder layer's
cross-attention keys/values, stored once by the encoder program; the decoder's own keys follow. So the
scheduler allocates, counts and frees cross-attention blocks with the request like any other, and a
step can mix new requests (encoder run + decoder prefill) with decode rows of running ones: the
encoder program runs first on the step's new encoder inputs, then the decoder program on every
decoder token of the step. A chunk that starts a request holds its whole encoder input and at least
the first decoder token (`EncoderInput.clip_chunk`); prefix caching is off for these engines (cross
keys depend on the whole input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kiln.engine.manifest import EncoderDecoderFacts
from kiln.engine.programs import Program
from kiln.errors import RequestError
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.in_flight import TokenPatch, apply_patch
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.scheduler import ScheduledChunk


@dataclass(frozen=True)
class EncoderInput:
    """Stands in `Sequence.mm` of an encoder-decoder request: its first `length` tokens are the encoder's;
    `images`: the `MultimodalData` of a vision-language request (image rows of its encoder input);
    `cross_spans`: each prompt token's cross-attention (begin, end) where the decoder takes them (Mllama)."""

    length: int
    images: Any = None
    cross_spans: tuple[tuple[int, int], ...] = ()

    def cross_span(self, position: int) -> tuple[int, int]:
        """The cross-attention (begin, end) of the token at sequence `position` (generated tokens: the last prompt
        token's, as transformers' generate extends its mask)."""
        if not self.cross_spans:
            return 0, self.length
        return self.cross_spans[min(position, len(self.cross_spans) - 1)]

    def clip_chunk(self, start: int, num_tokens: int) -> int:
        """A chunk that starts the request runs its encoder input whole and at least one decoder token."""
        if start > self.length:
            return num_tokens
        return num_tokens if start + num_tokens > self.length else 0

    def block_at(self, start: int) -> int:
        return max(1, self.length + 1 - start)

    def block_extra_keys(self, block_size: int) -> list[Any]:
        return []


def encoder_length(seq: Any, limit: int) -> int:
    """The encoder length of a sequence. One without an `EncoderInput` (the memory plan's measured step) is
    encoder input up to `limit` (max_encoder_input_len) but its last token, then decoder tokens."""
    mm = getattr(seq, "mm", None)
    return mm.length if isinstance(mm, EncoderInput) else max(min(seq.num_tokens - 1, limit), 1)


def request_ids(
    encoder_ids: list[int], facts: EncoderDecoderFacts, images: Any = None
) -> tuple[list[int], EncoderInput]:
    """The sequence of a request (encoder input + decoder prefix) and its `EncoderInput`; a clear error
    for an input longer than the engine's max_encoder_input_len. Where the decoder takes the prompt (Mllama),
    `encoder_ids` are the image rows' placeholders, then the text."""
    if facts.decoder_prompt:
        length = 0 if images is None else int((images.rows >= 0).sum())
        spans = images.cross_spans if images is not None else None
        pairs = () if spans is None else tuple((int(b), int(e)) for b, e in spans.tolist())
        encoder_ids, text = encoder_ids[:length], encoder_ids[length:]
    if len(encoder_ids) > facts.max_encoder_input_len:
        raise RequestError(
            f"the encoder input has {len(encoder_ids)} tokens, more than this engine's max_encoder_input_len "
            f"({facts.max_encoder_input_len}); "
            + ("use fewer images" if facts.decoder_prompt else "shorten it")
            + " or rebuild with a larger --max-encoder-input-len"
        )
    if facts.decoder_prompt:
        return [*encoder_ids, *text], EncoderInput(length, images, pairs or ((0, 0),))
    return [*encoder_ids, *facts.decoder_prefix], EncoderInput(len(encoder_ids), images)


class EncoderDecoderRunner(ModelRunner):
    """Runs a step: the encoder program on the step's new encoder inputs, then the decoder program."""

    def __init__(
        self,
        program: Program,
        encoder: Program,
        kv_cache: torch.Tensor,
        kv: KVCacheManager,
        device: torch.device,
        max_encoder_len: int,
        image_hidden: int | None = None,
        cross_spans: bool = False,
    ) -> None:
        super().__init__(program, kv_cache, kv, device)
        self.encoder = encoder
        self.max_encoder_len = max_encoder_len
        self.cross_spans = cross_spans  # the decoder program takes each token's cross-attention rows (Mllama)
        # A vision-language engine's encoder also takes image rows (mm_embeds, mm_index); a step without
        # images passes one zero row.
        self.empty_row = None
        if image_hidden is not None:
            self.empty_row = torch.zeros(1, image_hidden, dtype=kv_cache.dtype, device=device)

    def encoder_inputs(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, ...] | None:
        """The encoder program's inputs for the chunks that start their request, or None when none does."""
        ids: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for i, chunk in enumerate(c for c in chunks if c.start == 0):
            length = encoder_length(chunk.seq, self.max_encoder_len)
            table = self.kv.block_table(chunk.seq.request_id)
            ids.extend(chunk.seq.token_slice(0, length))
            positions.extend(range(length))
            seq_ids.extend([i] * length)
            slots.extend(table[p // bs] * bs + p % bs for p in range(length))
        if not ids:
            return None
        dev = self.device
        longs = [torch.tensor(values, dtype=torch.int64, device=dev) for values in (ids, positions, seq_ids, slots)]
        if self.empty_row is None:
            return (*longs, self.kv_cache)
        return (*longs, self.kv_cache, *self._image_rows([c for c in chunks if c.start == 0]))

    def _image_rows(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mm_embeds, mm_index) of the encoder inputs of `chunks`: each request's image rows, in order."""
        pieces: list[torch.Tensor] = []
        index: list[torch.Tensor] = []
        offset = 0
        for chunk in chunks:
            length = encoder_length(chunk.seq, self.max_encoder_len)
            mm = getattr(chunk.seq.mm, "images", None)
            if mm is None:
                index.append(torch.full((length,), -1, dtype=torch.int64))
                continue
            rows = mm.rows[:length]
            index.append(torch.where(rows >= 0, rows + offset, -1))
            pieces.append(mm.embeds)
            offset += mm.embeds.shape[0]
        assert self.empty_row is not None
        embeds = torch.cat(pieces) if pieces else self.empty_row
        return embeds, torch.cat(index).to(self.device)

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """The decoder program's inputs: each chunk's decoder tokens (those after its encoder input)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        encoder_lens: list[int] = []
        starts = [0]
        tables = []
        sampled: list[int] = []
        logits_rows: list[int] = []
        spans: list[tuple[int, int]] = []
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            length = encoder_length(seq, self.max_encoder_len)
            first, end = max(chunk.start, length), chunk.start + chunk.num_tokens
            table = self.kv.block_table(seq.request_id)
            input_ids.extend(seq.token_slice(first, end))
            positions.extend(p - length for p in range(first, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(first, end))
            seq_lens.append(end)
            encoder_lens.append(length)
            starts.append(starts[-1] + end - first)
            tables.append(table[: -(-end // bs)])
            if self.cross_spans:
                mm = seq.mm if isinstance(seq.mm, EncoderInput) else EncoderInput(length)
                spans.extend(mm.cross_span(p) for p in range(first, end))
            if chunk.completes:
                logits_rows.append(starts[-1] - 1)
                sampled.append(i)
        width = max(len(t) for t in tables)
        dev = self.device
        tensors: tuple[torch.Tensor, ...] = (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            torch.tensor(slots, dtype=torch.int64, device=dev),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            torch.tensor(starts, dtype=torch.int32, device=dev),
            torch.tensor(logits_rows or [0], dtype=torch.int64, device=dev),
            self.kv_cache,
            torch.tensor(encoder_lens, dtype=torch.int32, device=dev),
        )
        if self.cross_spans:
            tensors += (torch.tensor(spans, dtype=torch.int64, device=dev).view(-1, 2),)
        return tensors, sampled

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk], patch: TokenPatch | None = None) -> tuple[torch.Tensor, list[int]]:
        graphs = self.graphs
        if (
            graphs is not None
            and graphs.bucket_for(len(chunks)) is not None
            and all(
                c.num_tokens == 1 and c.completes and c.start > encoder_length(c.seq, self.max_encoder_len)
                for c in chunks
            )
        ):
            return self._run_decoder_graph(graphs, chunks, patch), list(range(len(chunks)))
        encoder = self.encoder_inputs(chunks)
        if encoder is not None:
            self.encoder(*encoder)
        inputs, sampled = self.prepare(chunks)
        if patch:  # decode rows only (a pipelined step): row j is chunk j's one token
            apply_patch(inputs[0], patch, list(patch[0]))
        return self.program(*inputs)[: len(sampled)], sampled

    def _run_decoder_graph(
        self, graphs: DecodeGraphs, chunks: Sequence[ScheduledChunk], patch: TokenPatch | None
    ) -> torch.Tensor:
        """A decoder step of one token per request, replayed from a captured CUDA graph."""
        bs = self.block_size
        ids, positions, slots, lens, tables, encoder_lens, spans = [], [], [], [], [], [], []
        for chunk in chunks:
            seq, p = chunk.seq, chunk.start
            length = encoder_length(seq, self.max_encoder_len)
            table = self.kv.block_table(seq.request_id)
            ids.append(seq.token_slice(p, p + 1)[0])
            positions.append(p - length)
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(table[: p // bs + 1])
            encoder_lens.append(length)
            if self.cross_spans:
                spans.append(seq.mm.cross_span(p) if isinstance(seq.mm, EncoderInput) else (0, length))
        return graphs.run(ids, positions, slots, lens, tables, patch, encoder_lens, spans)
