"""The CPU path of kiln's paged attention: every decode row of a step in one batched SDPA call.

`kiln.kernels.reference.paged_attention` loops over sequences with a dozen small ops each, which
made a decode step at batch 8 several times slower than the model's own matmuls on a 2-core CPU.
Here the keys and values of all one-token rows are gathered through their block tables at once
(one `index_select` of whole blocks along the first dimension, into a buffer every layer reuses),
and a single `scaled_dot_product_attention` call attends for all of them, the grouped query heads
of one KV head taken as extra query rows (no key copy per group).
Rows with several new tokens (prompt chunks) run one SDPA call per sequence. Additive masks give
the causal bound (or `attend_end`) and the sliding window.

What depends only on the step's metadata (host copies of the lengths, block indices, masks) is
computed by the first layer and reused by the others: `_plan` keeps the last step's plan and
reuses it when the metadata tensors hold the same values (compared, never assumed).
Soft-capped logits (Gemma 2) keep the reference, which SDPA cannot express. Same layouts and
meaning as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kiln.kernels import kv_quant, reference
from kiln.kernels.kv_quant import as_bytes


def write_kv(
    kv_cache: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """`reference.write_kv`, in one indexed copy per plane when no token is skipped (a CPU can check)."""
    if slot_mapping.numel() == 0:
        return
    if int(slot_mapping.min()) < 0:
        reference.write_kv(kv_cache, layer, k, v, slot_mapping, k_scale, v_scale)
        return
    pages = as_bytes(kv_cache[layer])
    slots = pages.view(2, pages.shape[1] * pages.shape[2], *pages.shape[3:])  # [2, blocks * bs, Hkv, D]
    for plane, new, kv_scale in ((0, k, k_scale), (1, v, v_scale)):
        stored = new if new.dtype == kv_cache.dtype else as_bytes(kv_quant.store(new, kv_cache.dtype, kv_scale))
        slots[plane].index_copy_(0, slot_mapping, stored)


@dataclass
class _Group:
    """Sequences attended in one SDPA call: their query rows, block ids and key bounds."""

    rows: torch.Tensor | None  # [B * Tq] packed rows of the queries (None: every row, in order)
    blocks: torch.Tensor  # [B * num_blocks] int64: each sequence's first num_blocks cache blocks
    batch: int
    tq: int  # queries per sequence
    positions: torch.Tensor  # [B, Tq] int64
    limits: torch.Tensor  # [B, Tq] int64: exclusive key-position bound per query
    masks: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)
    picks: dict[int, torch.Tensor] = field(default_factory=dict)
    buffers: dict[tuple[torch.dtype, int], torch.Tensor] = field(default_factory=dict)

    def pick(self, pool_blocks: int) -> torch.Tensor:
        """[2 * B * num_blocks] rows of a layer's pages viewed as [2 * pool_blocks, block]: keys', then values'."""
        if pool_blocks not in self.picks:
            self.picks[pool_blocks] = torch.cat((self.blocks, self.blocks + pool_blocks))
        return self.picks[pool_blocks]

    def gather(self, pages: torch.Tensor) -> torch.Tensor:
        """[2, B * num_blocks, *block] of one layer's pages [2, pool_blocks, *block]: the group's blocks.

        One row gather along the first dimension (a contiguous copy per block, several times faster on a CPU
        than `index_select` along dim 1), into a buffer the group keeps for the next layer's call.
        """
        if not pages.is_contiguous():
            return pages.index_select(1, self.blocks)
        rows = pages.view(2 * pages.shape[1], -1)
        pick = self.pick(pages.shape[1])
        key = (rows.dtype, rows.shape[1])
        out = self.buffers.get(key)
        if out is None:
            out = self.buffers[key] = rows.new_empty(pick.shape[0], rows.shape[1])
        torch.index_select(rows, 0, pick, out=out)
        return out.view(2, -1, *pages.shape[2:])

    def mask(self, keys: int, group: int, sliding_window: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, group * Tq, keys] additive mask (0 or -inf), made once per window, group and dtype."""
        key = (sliding_window, group, dtype)
        if key not in self.masks:
            k_positions = torch.arange(keys)
            allowed = k_positions < self.limits[..., None]  # [B, Tq, L]
            if sliding_window > 0:
                allowed = allowed & (k_positions > self.positions[..., None] - sliding_window)
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
            shape = (self.batch, 1, group, self.tq, keys)
            self.masks[key] = additive[:, None, None].expand(shape).reshape(self.batch, 1, group * self.tq, keys)
        return self.masks[key]


@dataclass
class _Plan:
    """What one step's metadata says, for every layer: the SDPA groups, and whether rows need zeros."""

    groups: list[_Group]
    covers_all_rows: bool  # every packed row belongs to a group (no padding rows to zero)


def _group(
    seqs: list[int],
    rows: torch.Tensor | None,
    block_tables: torch.Tensor,
    lengths: list[int],
    counts: list[int],
    block_size: int,
    ends: torch.Tensor | None,
) -> _Group:
    """The group of sequences `seqs`, which all have counts[i] new tokens."""
    tq = counts[seqs[0]]
    num_blocks = -(-max(lengths[i] for i in seqs) // block_size)
    tables = block_tables if len(seqs) == len(lengths) else block_tables.index_select(0, torch.tensor(seqs))
    blocks = tables[:, :num_blocks].reshape(-1).long()
    positions = torch.tensor([[lengths[i] - tq + j for j in range(tq)] for i in seqs])
    limits = positions + 1 if ends is None else ends.view(len(seqs), tq).long()
    return _Group(rows, blocks, len(seqs), tq, positions, limits)


def _make_plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    attend_end: torch.Tensor | None,
    num_rows: int,
    block_size: int,
) -> _Plan:
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    counts = [starts[i + 1] - starts[i] for i in range(len(lengths))]
    decode = [i for i, n in enumerate(counts) if n == 1]
    args = (block_tables, lengths, counts, block_size)
    if len(decode) == len(lengths) == num_rows:  # a decode step: row i is sequence i
        return _Plan([_group(decode, None, *args, attend_end)], True)
    groups = []
    if decode:
        rows = torch.tensor([starts[i] for i in decode])
        groups.append(_group(decode, rows, *args, None if attend_end is None else attend_end.index_select(0, rows)))
    for i, n in enumerate(counts):
        if n > 1:
            rows = torch.arange(starts[i], starts[i + 1])
            ends = None if attend_end is None else attend_end[starts[i] : starts[i + 1]]
            groups.append(_group([i], rows, *args, ends))
    return _Plan(groups, False)


_last: tuple[tuple[torch.Tensor | None, ...], int, int, _Plan] | None = None


def _plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    attend_end: torch.Tensor | None,
    num_rows: int,
    block_size: int,
) -> _Plan:
    """The step's plan: the last one when the metadata holds the same values, else a new one."""
    global _last
    metadata = (block_tables, seq_lens, query_start_loc, attend_end)
    last = _last
    if (
        last is not None
        and last[1:3] == (num_rows, block_size)
        and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(metadata, last[0], strict=True)
        )
    ):
        return last[3]
    plan = _make_plan(block_tables, seq_lens, query_start_loc, attend_end, num_rows, block_size)
    _last = (tuple(None if t is None else t.clone() for t in metadata), num_rows, block_size, plan)
    return plan


def _attend(
    group: _Group,
    q: torch.Tensor,
    pages: torch.Tensor,
    scale: float,
    sliding_window: int,
    kv_scales: tuple[float, float],
) -> torch.Tensor:
    """[B * Tq, Hq, Dv] for the group's queries q [B * Tq, Hq, D]; pages: one layer's [2, blocks, ...]."""
    hq, d = q.shape[1], q.shape[2]
    picked = group.gather(as_bytes(pages)).view(pages.dtype)  # [2, B * num_blocks, bs, Hkv, D]
    batch, tq = group.batch, group.tq
    keys = kv_quant.load(picked[0], kv_scales[0], q.dtype).view(batch, -1, *picked.shape[3:])  # [B, L, Hkv, D]
    values = kv_quant.load(picked[1], kv_scales[1], q.dtype).view(batch, -1, *picked.shape[3:])
    hkv, length = keys.shape[2], keys.shape[1]
    per_kv = hq // hkv
    # query rows (kv head, group member, token) share their kv head's keys: no repeat of the keys
    rows = q.view(batch, tq, hkv, per_kv, d).permute(0, 2, 3, 1, 4).reshape(batch, hkv, per_kv * tq, d)
    mask = group.mask(length, per_kv, sliding_window, q.dtype)
    out = F.scaled_dot_product_attention(
        rows, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [B, Hkv, per_kv * Tq, Dv]
    dv = out.shape[-1]
    # contiguous, as the op's fake kernel says (a compiled program checks it): one sequence's prompt alone
    # would otherwise come back as a head-major view
    return out.view(batch, hkv, per_kv, tq, dv).permute(0, 3, 1, 2, 4).reshape(batch * tq, hq, dv).contiguous()


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
    attend_end: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`reference.paged_attention` for CPU tensors (see the module's docstring)."""
    if softcap > 0.0:
        return reference.paged_attention(
            q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, query_start_loc, layer, scale,
            sliding_window, softcap, attend_end, k_scale, v_scale,
        )  # fmt: skip
    write_kv(kv_cache, layer, k, v, slot_mapping, k_scale, v_scale)
    kv_scales = (k_scale, v_scale)
    plan = _plan(block_tables, seq_lens, query_start_loc, attend_end, q.shape[0], kv_cache.shape[3])
    pages = kv_cache[layer]
    if plan.covers_all_rows:
        return _attend(plan.groups[0], q, pages, scale, sliding_window, kv_scales)
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])  # rows of no sequence stay zero, as in the reference
    for group in plan.groups:
        assert group.rows is not None
        rows = q.index_select(0, group.rows)
        out.index_copy_(0, group.rows, _attend(group, rows, pages, scale, sliding_window, kv_scales))
    return out
