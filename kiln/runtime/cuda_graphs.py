"""CUDA graphs for decode steps: one graph per bucketed batch size, replayed with new metadata.

A decode step (every scheduled sequence computes exactly one token) is captured once per bucket
size, largest first, in one memory pool. Its inputs live in static buffers; a step copies its token
ids, positions, cache slots, lengths and block tables into them and replays the bucket that fits,
padding the unused rows: they write no cache slot (slot -1) and attend to one key, and their logits
are ignored. The engine program must not synchronise with the host (kiln's Triton attention does
not), so the whole forward pass is one graph launch.

All of a step's inputs travel in one host-to-device copy (`stage_step`). Each graph also takes the
ids of a pipelined step from the tokens the step before sampled on the device (`take_sampled_`),
and ends with the greedy choice of every row (`sampled`), which a plain-greedy batch uses as its
tokens: no kernel runs outside the graph but the copies in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kiln.kernels.argmax import argmax_rows
from kiln.runtime.in_flight import TokenPatch, take_sampled_


def bucket_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sorted({*sizes, max_batch_size})


def staged_words(max_batch_size: int, max_blocks: int) -> int:
    """int64 words of a decode step's packed inputs (see `staged_views`)."""
    return 4 * max_batch_size + -(-(max_batch_size + max_batch_size * max_blocks) // 2)


def staged_views(
    buffer: torch.Tensor, max_batch_size: int, max_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's inputs in one int64 buffer of `staged_words`, so that one copy sends them all:
    tokens [4, n] int64 (rows: ids, positions, cache slots, and the row of the device's sampled
    tokens an id comes from, -1 for none), then seq_lens [n] and block tables [n, max_blocks] int32."""
    n = max_batch_size
    int32 = buffer[4 * n :].view(torch.int32)
    return buffer[: 4 * n].view(4, n), int32[:n], int32[n : n + n * max_blocks].view(n, max_blocks)


def stage_step(
    buffer: torch.Tensor,
    max_batch_size: int,
    max_blocks: int,
    bucket: int,
    input_ids: Sequence[int],
    positions: Sequence[int],
    slots: Sequence[int],
    seq_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    sources: tuple[Sequence[int], Sequence[int]] = ((), ()),
) -> int:
    """Write a decode step of len(input_ids) <= bucket rows into `buffer` (laid out as `staged_views`);
    the rows after them up to `bucket` are padding: id 0, position 0, no cache slot, length 1, no
    source. sources = (rows, rows of the device's sampled tokens) for ids taken from the device.
    Returns how many leading words of the buffer the bucket's graph reads (block-table columns past
    a row's own blocks keep older values: the attention kernels read a row's first seq_len keys only)."""
    n = len(input_ids)
    tokens, lens, tables = staged_views(buffer, max_batch_size, max_blocks)
    tokens[:, :bucket] = torch.tensor([[0], [0], [-1], [-1]], dtype=torch.int64)
    tokens[0, :n] = torch.tensor(input_ids, dtype=torch.int64)
    tokens[1, :n] = torch.tensor(positions, dtype=torch.int64)
    tokens[2, :n] = torch.tensor(slots, dtype=torch.int64)
    rows, taken = sources
    if rows:
        tokens[3, list(rows)] = torch.tensor(taken, dtype=torch.int64)
    lens[:bucket] = 1
    lens[:n] = torch.tensor(seq_lens, dtype=torch.int32)
    width = max(len(t) for t in block_tables)
    tables[:n, :width] = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    return 4 * max_batch_size + -(-(max_batch_size + bucket * max_blocks) // 2)


class DecodeGraphs:
    def __init__(
        self,
        program: Callable[..., torch.Tensor],
        kv_cache: torch.Tensor,
        *,
        max_batch_size: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.program = program
        self.kv_cache = kv_cache
        self.device = device
        self.buckets = bucket_sizes(max_batch_size)
        self.max_blocks = max(2, max_blocks_per_seq)
        self.max_batch_size = n = max_batch_size
        # A step's inputs in one int64 buffer, sent in one host-to-device copy: token ids, positions,
        # cache slots and, per row, the row of `sampled` its id comes from (-1: the host's id); then
        # the sequence lengths and block tables as int32. Two pinned host copies take turns, so the
        # host never writes one whose transfer may still be queued (the step before's).
        words = staged_words(n, self.max_blocks)
        self._staged = torch.zeros(words, dtype=torch.int64, device=device)
        self.tokens, self.seq_lens, self.block_tables = staged_views(self._staged, n, self.max_blocks)
        self._hosts = [torch.zeros(words, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._turn = 0
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        # Each graph ends with the greedy choice of its logits rows, written here: the tokens of a
        # plain-greedy step, and the source of the next pipelined step's ids (read at its start).
        self.sampled = torch.zeros(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _inputs(self, b: int) -> tuple[torch.Tensor, ...]:
        return (
            self.tokens[0, :b],
            self.tokens[1, :b],
            self.tokens[2, :b],
            self.block_tables[:b],
            self.seq_lens[:b],
            self.query_start_loc[: b + 1],
            self.logits_indices[:b],
            self.kv_cache,
        )

    def _step(self, b: int) -> torch.Tensor:
        """What a graph of bucket b runs: ids from `sampled` where asked, the program, the greedy choice."""
        take_sampled_(self.tokens[0, :b], self.tokens[3, :b], self.sampled)
        logits = self.program(*self._inputs(b))
        argmax_rows(logits, out=self.sampled[:b])
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        self.tokens[2].fill_(-1)  # padding rows write no cache slot
        self.tokens[3].fill_(-1)  # and take no sampled token
        pool = None
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.buckets):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: lazy initialisation must not happen inside the capture
                    self._step(b)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(b)
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
    ) -> torch.Tensor:
        """Logits [len(input_ids), vocab] of one decode step (one token per sequence); `sampled[:n]`
        holds their argmax once the step has run.

        `patch` = (rows, source rows, device tokens): input_ids[rows] come from the device instead.
        """
        n = len(input_ids)
        b = self.bucket_for(n)
        if b is None or b not in self._graphs:
            raise ValueError(f"no captured graph holds a decode batch of {n}")
        host = self._hosts[self._turn]
        self._turn = 1 - self._turn
        sources: tuple[list[int], list[int]] = ([], [])
        if patch is not None and patch[1]:
            rows, taken, device_tokens = patch
            if device_tokens.data_ptr() != self.sampled.data_ptr():  # sampled outside a graph: bring them here
                self.sampled[: device_tokens.shape[0]].copy_(device_tokens)
            sources = (rows, taken)
        used = stage_step(
            host, self.max_batch_size, self.max_blocks, b, input_ids, positions, slots, seq_lens, block_tables, sources
        )
        self._staged[:used].copy_(host[:used], non_blocking=True)
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]
