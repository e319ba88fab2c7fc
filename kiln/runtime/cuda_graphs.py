"""CUDA graphs for decode steps: one graph per bucketed batch size, replayed with new metadata.

A decode step (every scheduled sequence computes exactly one token) is captured once per bucket
size, largest first, in one memory pool. Its inputs live in static buffers; a step copies its token
ids, positions, cache slots, lengths and block tables into them and replays the bucket that fits,
padding the unused rows: they write no cache slot (slot -1) and attend to one key, and their logits
are ignored. The engine program must not synchronise with the host (kiln's Triton attention does
not), so the whole forward pass is one graph launch.

A vision-language program takes more inputs (`DecodeExtras`); in a decode step they have static
shapes: one zero `mm_embeds` row, `mm_index` all -1, M-RoPE positions [R, n] whose rows all hold
the position the caller gives (p + the sequence's delta), and `attend_end` = seq_lens (p + 1).
An encoder-decoder engine's decoder program takes `encoder_lens [B]` last (`encoder_decoder=True`);
padding rows get 0 (no cross keys). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kiln.runtime.in_flight import TokenPatch, apply_patch


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted({*sizes, max_batch_size})


@dataclass(frozen=True)
class DecodeExtras:
    """The inputs a vision-language LLM program takes after the text ones (see the module doc)."""

    hidden_size: int  # width of mm_embeds
    dtype: torch.dtype  # of mm_embeds
    position_rows: int  # > 1: positions are [position_rows, T] (M-RoPE)
    limits: bool  # the program takes attend_end [T]


ATTEND_END_ROW = 5  # row of DecodeGraphs.tokens holding attend_end (vision-language programs only)


class DecodeGraphs:
    def __init__(
        self,
        program: Callable[..., torch.Tensor],
        kv_cache: torch.Tensor,
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        device: torch.device,
        extras: DecodeExtras | None = None,
        encoder_decoder: bool = False,
        cross_spans: bool = False,
    ) -> None:
        self.program = program
        self.kv_cache = kv_cache
        self.device = device
        self.extras = extras
        self.buckets = bucket_sizes(max_batch_size)
        self.max_blocks = max(2, max_blocks_per_seq)
        n = max_batch_size
        # Static inputs: ids, positions and slots in one int64 buffer (with two more rows for the
        # positions and source rows of tokens patched in from the device, and attend_end for a
        # vision-language program); lengths and tables in int32.
        rows = 5 if extras is None else ATTEND_END_ROW + 1
        self.tokens = torch.zeros(rows, n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        # Host staging, pinned so the copies are asynchronous. Two sets take turns: a pipelined step
        # is staged while the step before may not have been copied yet (the host has only waited
        # for the one before that), so a step never rewrites the set its predecessor is copying.
        self._staging = [
            (
                torch.zeros(rows, n, dtype=torch.int64).pin_memory(),
                torch.ones(n, dtype=torch.int32).pin_memory(),
                torch.zeros(n, self.max_blocks, dtype=torch.int32).pin_memory(),
            )
            for _ in range(2)
        ]
        self._turn = 0
        self.encoder_lens: torch.Tensor | None = None
        if encoder_decoder:
            self.encoder_lens = torch.zeros(n, dtype=torch.int32, device=device)
            self._encoder_staging = [torch.zeros(n, dtype=torch.int32).pin_memory() for _ in range(2)]
        self.cross_spans: torch.Tensor | None = None  # Mllama's decoder: each row's cross-attention rows, last
        if cross_spans:
            self.cross_spans = torch.zeros(n, 2, dtype=torch.int64, device=device)
            self._spans_staging = [torch.zeros(n, 2, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if extras is not None:
            r = extras.position_rows
            self.mm_embeds = torch.zeros(1, extras.hidden_size, dtype=extras.dtype, device=device)
            self.mm_index = torch.full((n,), -1, dtype=torch.int64, device=device)
            # M-RoPE positions: bucket b reads the first r * b values as a contiguous [r, b] view.
            self.mrope = torch.zeros(r * n, dtype=torch.int64, device=device)
            self._mrope_staging = [torch.zeros(r * n, dtype=torch.int64).pin_memory() for _ in range(2)]

    def _inputs(self, b: int) -> tuple[torch.Tensor, ...]:
        base = [
            self.tokens[0, :b],
            self.tokens[1, :b],
            self.tokens[2, :b],
            self.block_tables[:b],
            self.seq_lens[:b],
            self.query_start_loc[: b + 1],
            self.logits_indices[:b],
            self.kv_cache,
        ]
        if self.encoder_lens is not None:
            base.append(self.encoder_lens[:b])
        if self.cross_spans is not None:
            base.append(self.cross_spans[:b])
        extras = self.extras
        if extras is None:
            return tuple(base)
        if extras.position_rows > 1:
            base[1] = self.mrope[: extras.position_rows * b].view(extras.position_rows, b)
        base += [self.mm_embeds, self.mm_index[:b]]
        if extras.limits:
            base.append(self.tokens[ATTEND_END_ROW, :b])
        return tuple(base)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        self.tokens[2].fill_(-1)  # padding rows write no cache slot
        if self.extras is not None:
            self.tokens[ATTEND_END_ROW].fill_(1)
        pool = None
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: lazy initialisation must not happen inside the capture
                    self.program(*self._inputs(b))
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.program(*self._inputs(b))
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        patch: TokenPatch | None = None,
        encoder_lens: Sequence[int] = (),
        cross_spans: Sequence[tuple[int, int]] = (),
    ) -> torch.Tensor:
        """Logits [len(input_ids), vocab] of one decode step (one token per sequence).

        `patch` = (rows, source rows, device tokens): input_ids[rows] come from the device instead.
        With M-RoPE extras, `positions` are the rotary positions (p + the sequence's delta).
        """
        n = len(input_ids)
        b = self.bucket_for(n)
        if b is None or b not in self._graphs:
            raise ValueError(f"no captured graph holds a decode batch of {n}")
        turn = self._turn
        host, lens_host, tables_host = self._staging[turn]
        self._turn = 1 - turn
        host[0, :b] = 0
        host[1, :b] = 0
        host[2, :b] = -1
        host[0, :n] = torch.tensor(input_ids, dtype=torch.int64)
        host[1, :n] = torch.tensor(positions, dtype=torch.int64)
        host[2, :n] = torch.tensor(slots, dtype=torch.int64)
        patched = len(patch[1]) if patch is not None else 0
        if patch is not None and patched:  # where the device's tokens go, and which of them: copied with the rest
            host[3, :patched] = torch.tensor(patch[0], dtype=torch.int64)
            host[4, :patched] = torch.tensor(patch[1], dtype=torch.int64)
        lens_host[:b] = 1
        lens_host[:n] = torch.tensor(seq_lens, dtype=torch.int32)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        tables_host[:n, :width] = tables
        if self.extras is not None:
            self._stage_extras(turn, host, positions, seq_lens, n, b)
        if self.encoder_lens is not None:
            staged = self._encoder_staging[turn]
            staged[:b] = 0
            staged[:n] = torch.tensor(encoder_lens, dtype=torch.int32)
            self.encoder_lens[:b].copy_(staged[:b], non_blocking=True)
        if self.cross_spans is not None:  # padding rows: (0, 0), no image (their cross-attention layers skipped)
            spans = self._spans_staging[turn]
            spans[:b] = 0
            spans[:n] = torch.tensor(cross_spans, dtype=torch.int64).view(n, 2)
            self.cross_spans[:b].copy_(spans[:b], non_blocking=True)
        self.tokens[:, :b].copy_(host[:, :b], non_blocking=True)
        self.seq_lens[:b].copy_(lens_host[:b], non_blocking=True)
        self.block_tables[:n, :width].copy_(tables_host[:n, :width], non_blocking=True)
        if patch is not None and patched:
            apply_patch(self.tokens[0], patch, patch[0], indices=self.tokens[3:5, :patched])
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]

    def _stage_extras(
        self, turn: int, host: torch.Tensor, positions: Sequence[int], seq_lens: Sequence[int], n: int, b: int
    ) -> None:
        """attend_end (= seq_lens, 1 on padding rows) into `host`; M-RoPE positions staged and copied."""
        assert self.extras is not None
        host[ATTEND_END_ROW, :b] = 1
        host[ATTEND_END_ROW, :n] = torch.tensor(seq_lens, dtype=torch.int64)
        r = self.extras.position_rows
        if r > 1:
            staged = self._mrope_staging[turn][: r * b].view(r, b)
            staged.zero_()
            staged[:, :n] = torch.tensor(positions, dtype=torch.int64)
            self.mrope[: r * b].copy_(staged.flatten(), non_blocking=True)
