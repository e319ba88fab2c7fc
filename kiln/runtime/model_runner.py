"""Turns scheduled chunks into the engine program's packed inputs and runs it."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch

from kiln.engine.programs import Program
from kiln.runtime.cuda_graphs import DecodeGraphs
from kiln.runtime.in_flight import TokenPatch, apply_patch
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.prompt_logprobs import prompt_spans
from kiln.runtime.scheduler import ScheduledChunk

_ARRAY_CODES = {torch.int64: "q", torch.int32: "i"}


def host_tensor(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)`; on the CPU through an `array` (several times faster
    for the few dozen ints of a decode step's inputs, which a CPU engine's step waits for)."""
    if device.type != "cpu" or not values:
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.frombuffer(array(_ARRAY_CODES[dtype], values), dtype=dtype)


class ModelRunner:
    def __init__(
        self,
        program: Program,
        kv_cache: torch.Tensor,
        kv: KVCacheManager,
        device: torch.device,
    ) -> None:
        self.program = program
        self.kv_cache = kv_cache
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA: replayed for decode steps
        # A pipeline-parallel engine's rank 0: a step's sequences go through the stages in this many
        # micro-batches, so that the stages overlap (the program is a distributed.LeaderProgram).
        self.microbatches = 1

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """Packed inputs for `chunks`, and the indices of the chunks that sample.

        The program returns one logits row per sampling chunk, then the rows of `prompt_spans(chunks)`.
        """
        spans = prompt_spans(chunks)
        if not spans and all(c.num_tokens == 1 and c.completes for c in chunks):
            return self._prepare_decode(chunks)
        return self._prepare_packed(chunks)

    def _prepare_packed(self, chunks: Sequence[ScheduledChunk]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """`prepare` for any step: chunks of any length, prompt-scoring rows."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        tables = []
        logits_rows: list[int] = []
        sampled: list[int] = []
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            end = chunk.start + chunk.num_tokens
            table = self.kv.block_table(seq.request_id)
            input_ids.extend(seq.token_slice(chunk.start, end))
            span = range(chunk.start, end)
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            seq_lens.append(end)
            starts.append(starts[-1] + chunk.num_tokens)
            tables.append(table[: -(-end // bs)])
            if chunk.completes:
                logits_rows.append(starts[-1] - 1)
                sampled.append(i)
        for scored in prompt_spans(chunks):  # prompt-scoring rows come after the sampled ones
            row = starts[scored.chunk] + scored.first - chunks[scored.chunk].start
            logits_rows.extend(range(row, row + scored.count))
        if not logits_rows:  # only partial prompt chunks: the program still returns one row, unused
            logits_rows = [0]
        return self._tensors(input_ids, positions, slots, tables, seq_lens, starts, logits_rows), sampled

    def _prepare_decode(self, chunks: Sequence[ScheduledChunk]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        """`prepare` for a step of one-token chunks that all sample (a decode step): the same inputs, sooner."""
        bs = self.block_size
        input_ids, positions, slots, tables = [], [], [], []
        for chunk in chunks:
            seq, p = chunk.seq, chunk.start
            table = self.kv.block_table(seq.request_id)
            input_ids.append(seq.token_slice(p, p + 1)[0])
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            tables.append(table[: p // bs + 1])
        rows = list(range(len(chunks)))
        seq_lens = [p + 1 for p in positions]
        return self._tensors(input_ids, positions, slots, tables, seq_lens, [0, *(r + 1 for r in rows)], rows), rows

    def _tensors(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        seq_lens: list[int],
        starts: list[int],
        logits_rows: list[int],
    ) -> tuple[torch.Tensor, ...]:
        """The program's inputs from host lists (block tables padded with block 0 to the widest)."""
        width = max(len(t) for t in tables)
        flat_tables: list[int] = []
        for t in tables:
            flat_tables += t
            flat_tables += [0] * (width - len(t))
        dev = self.device
        return (
            host_tensor(input_ids, torch.int64, dev),
            host_tensor(positions, torch.int64, dev),
            host_tensor(slots, torch.int64, dev),
            host_tensor(flat_tables, torch.int32, dev).view(len(tables), width),
            host_tensor(seq_lens, torch.int32, dev),
            host_tensor(starts, torch.int32, dev),
            host_tensor(logits_rows, torch.int64, dev),
            self.kv_cache,
        )

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk], patch: TokenPatch | None = None) -> tuple[torch.Tensor, list[int]]:
        """Logits for the chunks that complete, and those chunks' indices: rows [0, len(sampled)) are
        theirs, any after are the prompt-scoring rows of `prompt_spans(chunks)` (such steps run eagerly).

        `patch` = (chunk indices, rows, tokens on the device): those decode chunks' input token is
        `tokens[row]`, sampled by a step whose result the host has not read yet.
        """
        graphs = self.graphs
        if graphs is not None and all(
            c.num_tokens == 1 and c.completes and not c.seq.needs_prompt_logits for c in chunks
        ):
            positions = self.decode_positions(chunks) if graphs.bucket_for(len(chunks)) is not None else None
            if positions is not None:
                return self._run_decode_graph(graphs, chunks, patch, positions), list(range(len(chunks)))
        if self.microbatches > 1 and len(chunks) > 1 and not patch and not prompt_spans(chunks):
            return self._run_microbatches(chunks)
        inputs, sampled = self.prepare(chunks)
        if patch:
            starts = [0]
            for c in chunks:
                starts.append(starts[-1] + c.num_tokens)
            apply_patch(inputs[0], patch, [starts[j + 1] - 1 for j in patch[0]])
        logits = self.program(*inputs)
        return logits[: len(sampled) + sum(s.count for s in prompt_spans(chunks))], sampled

    def _run_microbatches(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, list[int]]:
        """The step's chunks in consecutive micro-batches; their sampled rows, concatenated in chunk order."""
        size = -(-len(chunks) // min(self.microbatches, len(chunks)))
        parts = [chunks[i : i + size] for i in range(0, len(chunks), size)]
        prepared = [self.prepare(part) for part in parts]
        outs = self.program.run_microbatches([inputs for inputs, _ in prepared])  # type: ignore[attr-defined]
        sampled, rows, offset = [], [], 0
        for part, (_, part_sampled), logits in zip(parts, prepared, outs):
            sampled += [offset + i for i in part_sampled]
            rows.append(logits[: len(part_sampled)])
            offset += len(part)
        return torch.cat(rows), sampled

    def decode_positions(self, chunks: Sequence[ScheduledChunk]) -> list[int] | None:
        """The position input of each one-token chunk of a decode step, or None when the step must
        run eagerly (a vision-language row that needs more than the graphs' static inputs)."""
        return [c.start for c in chunks]

    def _run_decode_graph(
        self, graphs: DecodeGraphs, chunks: Sequence[ScheduledChunk], patch: TokenPatch | None, positions: list[int]
    ) -> torch.Tensor:
        bs = self.block_size
        ids, slots, lens, tables = [], [], [], []
        for chunk in chunks:
            seq, p = chunk.seq, chunk.start
            table = self.kv.block_table(seq.request_id)
            ids.append(seq.token_slice(p, p + 1)[0])
            slots.append(table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(table[: p // bs + 1])
        return graphs.run(ids, positions, slots, lens, tables, patch)
