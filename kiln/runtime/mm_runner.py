"""The model runner of a vision-language engine: the text inputs plus the prompt-embedding table."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kiln.engine.manifest import MultimodalFacts
from kiln.engine.programs import Program
from kiln.runtime.cuda_graphs import DecodeExtras
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.multimodal import MultimodalData
from kiln.runtime.scheduler import ScheduledChunk


def decode_position(mm: MultimodalData | None, p: int) -> int | None:
    """The rotary position of a decode row at cache position p, or None when the row needs an
    eager step: an image token, or M-RoPE rows that differ (only prompt tokens can be either)."""
    if mm is None:
        return p
    if p >= mm.prompt_len:
        return p + mm.position_delta if mm.positions is not None else p
    if int(mm.rows[p]) >= 0:  # an image token (its feature row, and maybe a bidirectional bound)
        return None
    if mm.positions is None:
        return p
    column = mm.positions[:, p]
    return int(column[0]) if bool((column == column[0]).all()) else None


def decode_extras(facts: MultimodalFacts | None, dtype: torch.dtype) -> DecodeExtras | None:
    """What `DecodeGraphs` must feed a vision-language engine's program beside the text inputs."""
    if facts is None:
        return None
    return DecodeExtras(facts.hidden_size, dtype, facts.position_rows, facts.bidirectional_images)


def _chunk_extras(
    mm: MultimodalData | None, start: int, end: int, rows_offset: int, facts: MultimodalFacts
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(feature rows used, their index per token (shifted by rows_offset), positions [R, n], attend_end [n])."""
    span = torch.arange(start, end)
    limits = span + 1 if facts.bidirectional_images else None
    positions = span[None].expand(facts.position_rows, -1)
    if mm is None:
        return None, torch.full((end - start,), -1, dtype=torch.int64), positions, limits
    prompt_end = min(end, mm.prompt_len)
    rows = torch.full((end - start,), -1, dtype=torch.int64)
    used = None
    if start < prompt_end:
        prompt_rows = mm.rows[start:prompt_end]
        hit = prompt_rows >= 0
        if bool(hit.any()):
            lo, hi = int(prompt_rows[hit].min()), int(prompt_rows[hit].max()) + 1
            used = mm.embeds[lo:hi]
            rows[: prompt_end - start] = torch.where(hit, prompt_rows - lo + rows_offset, -1)
    if mm.positions is not None:
        positions = (span + mm.position_delta)[None].expand(facts.position_rows, -1).clone()
        if start < prompt_end:
            positions[:, : prompt_end - start] = mm.positions[:, start:prompt_end]
    if limits is not None and start < prompt_end:
        limits[: prompt_end - start] = mm.attend_end(start, prompt_end)
    return used, rows, positions, limits


class MultimodalModelRunner(ModelRunner):
    def __init__(
        self,
        program: Program,
        kv_cache: torch.Tensor,
        kv: KVCacheManager,
        device: torch.device,
        facts: MultimodalFacts,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(program, kv_cache, kv, device)
        self.facts = facts
        self.empty_row = torch.zeros(1, facts.hidden_size, dtype=dtype, device=device)

    def decode_positions(self, chunks: Sequence[ScheduledChunk]) -> list[int] | None:
        positions = []
        for chunk in chunks:
            pos = decode_position(getattr(chunk.seq, "mm", None), chunk.start)
            if pos is None:
                return None
            positions.append(pos)
        return positions

    def prepare(self, chunks: Sequence[ScheduledChunk]) -> tuple[tuple[torch.Tensor, ...], list[int]]:
        tensors, sampled = super().prepare(chunks)
        pieces: list[torch.Tensor] = []
        index, positions, limits = [], [], []
        offset = 0
        for chunk in chunks:
            mm = getattr(chunk.seq, "mm", None)
            used, rows, pos, lim = _chunk_extras(mm, chunk.start, chunk.start + chunk.num_tokens, offset, self.facts)
            if used is not None:
                pieces.append(used)
                offset += used.shape[0]
            index.append(rows)
            positions.append(pos)
            if lim is not None:
                limits.append(lim)
        dev = self.device
        embeds = torch.cat(pieces) if pieces else self.empty_row
        extra = [embeds, torch.cat(index).to(dev)]
        if limits:
            extra.append(torch.cat(limits).to(dev))
        base = list(tensors)
        if self.facts.position_rows > 1:
            base[1] = torch.cat(positions, dim=1).to(dev)
        return (*base, *extra), sampled


def make_runner(
    facts: MultimodalFacts | None,
    program: Program,
    kv_cache: torch.Tensor,
    kv: KVCacheManager,
    device: torch.device,
) -> ModelRunner:
    """The text runner, or the multimodal one for an engine with a vision program."""
    if facts is None:
        return ModelRunner(program, kv_cache, kv, device)
    return MultimodalModelRunner(program, kv_cache, kv, device, facts, kv_cache.dtype)
