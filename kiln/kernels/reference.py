"""Plain PyTorch reference implementations of kiln's attention operators.

Layouts used throughout kiln:
  q            [T, num_q_heads, head_dim]        packed tokens of every sequence in the step
  k, v         [T, num_kv_heads, head_dim]       the same tokens' new keys and values
  kv_cache     [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping [T] int64: the flat cache slot (block * block_size + offset) of each token; < 0 = skip
  block_tables [B, max_blocks] int32: each sequence's cache blocks, in order
  seq_lens     [B] int32: each sequence's context length after this step (cached + new tokens)
  query_start_loc [B + 1] int32: prefix sums of the new tokens per sequence

Each sequence's new tokens are the last ones of its context, so the query at local index j
sits at absolute position seq_len - num_new + j. A query attends to key positions p with
p <= its own position and, when sliding_window > 0, p > its position - sliding_window
(the window counts the query itself, as in Hugging Face's masks).
"""

from __future__ import annotations

import math

import torch

from kiln.kernels.kv_quant import as_bytes, load, store


def _masked_softmax_attention(
    q: torch.Tensor,  # [Tq, Hq, D]
    keys: torch.Tensor,  # [Tk, Hkv, D]
    values: torch.Tensor,  # [Tk, Hkv, Dv]
    q_positions: torch.Tensor,  # [Tq]
    k_positions: torch.Tensor,  # [Tk]
    scale: float,
    sliding_window: int,
    softcap: float,
    q_limits: torch.Tensor | None = None,  # [Tq]: exclusive key-position bound per query (default: position + 1)
) -> torch.Tensor:
    num_q_heads, num_kv_heads = q.shape[1], keys.shape[1]
    group = num_q_heads // num_kv_heads
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys.float()) * scale
    if softcap > 0.0:
        scores = torch.tanh(scores / softcap) * softcap
    if q_limits is None:
        allowed = k_positions[None, :] <= q_positions[:, None]
    else:
        allowed = k_positions[None, :] < q_limits[:, None]
    if sliding_window > 0:
        allowed = allowed & (k_positions[None, :] > q_positions[:, None] - sliding_window)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values.float()).to(q.dtype)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int, softcap: float
) -> torch.Tensor:
    """Attention of one sequence over itself, no cache: the meaning of a captured attention site."""
    positions = torch.arange(q.shape[0], device=q.device)
    return _masked_softmax_attention(q, k, v, positions, positions, scale, sliding_window, softcap)


def write_kv(
    kv_cache: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store each token's key and value at its slot of layer `layer` (negative slots are skipped);
    a narrow (FP8 / int8) cache stores them divided by k_scale / v_scale (`kiln.kernels.kv_quant`).

    No boolean indexing (so no host synchronisation): a skipped token is sent to slot 0 with the
    value slot 0 holds after the write, which is the value of a kept token aimed at slot 0 if
    there is one, else slot 0's current value.
    """
    if slot_mapping.numel() == 0:
        return
    keep = slot_mapping >= 0
    slots = torch.where(keep, slot_mapping, torch.zeros_like(slot_mapping))
    at_zero = keep & (slot_mapping == 0)
    writer = at_zero.to(torch.int32).argmax().view(1)  # a kept token aimed at slot 0, if any
    for plane, new, kv_scale in ((0, k, k_scale), (1, v, v_scale)):
        flat = as_bytes(kv_cache[layer, plane].flatten(0, 1))
        new = as_bytes(store(new, kv_cache.dtype, kv_scale))
        slot0 = torch.where(at_zero.any(), new.index_select(0, writer), flat[:1])
        values = torch.where(keep.view(-1, *([1] * (new.dim() - 1))), new, slot0)
        flat.index_copy_(0, slots, values)


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
    """Write the new keys/values into the paged cache, then attend through each block table.

    `attend_end [T]`, when given, replaces the causal bound: query i sees keys at positions
    < attend_end[i] (vision-language models whose image tokens see their whole image).
    k_scale, v_scale: a narrow cache's scales for this layer (see `write_kv`).
    """
    write_kv(kv_cache, layer, k, v, slot_mapping, k_scale, v_scale)
    block_size = kv_cache.shape[3]
    key_pages, value_pages = kv_cache[layer, 0], kv_cache[layer, 1]
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for i, context_len in enumerate(lengths):
        begin, end = starts[i], starts[i + 1]
        num_new = end - begin
        if num_new == 0:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        keys = load(key_pages[blocks].flatten(0, 1)[:context_len], k_scale, q.dtype)
        values = load(value_pages[blocks].flatten(0, 1)[:context_len], v_scale, q.dtype)
        k_positions = torch.arange(context_len, device=q.device)
        q_positions = k_positions[context_len - num_new :]
        out[begin:end] = _masked_softmax_attention(
            q[begin:end],
            keys,
            values,
            q_positions,
            k_positions,
            scale,
            sliding_window,
            softcap,
            None if attend_end is None else attend_end[begin:end],
        )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias over x's last dim, computed in fp32 and returned in x's dtype (`kiln::linear`)."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dim, rounded as transformers' MLP rounds it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: fp32 statistics, the normalised x rounded to x's dtype, then times weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_width: int) -> torch.Tensor:
    """Rotary embedding of the first `rope_width` columns of x [R, N], as heads of head_dim = cos.shape[-1]:
    each head h becomes h * cos + rotate_half(h) * sin with cos/sin [R, head_dim] (Llama's
    `apply_rotary_pos_emb`, rotate_half(h) = [-h2, h1]), rounded op by op as transformers rounds it;
    the other columns are returned unchanged. A new tensor."""
    rows, head_dim = x.shape[0], cos.shape[-1]
    half = head_dim // 2
    heads = x[:, :rope_width].reshape(rows, rope_width // head_dim, head_dim)
    rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    roped = heads * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat((roped.reshape(rows, rope_width), x[:, rope_width:]), dim=-1)


def relative_bucket(distance: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact below half the (signed) buckets, then
    logarithmic up to `max_distance`; unidirectional buckets count only keys before the query."""
    if bidirectional:
        half = num_buckets // 2
        offset = (distance > 0).long() * half
        magnitude = distance.abs()
    else:
        half = num_buckets
        offset = torch.zeros_like(distance)
        magnitude = (-distance).clamp(min=0)
    exact = half // 2
    far = exact + (torch.log(magnitude.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return offset + torch.where(magnitude < exact, magnitude, far)


def span_softmax(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
    max_distance: int,
) -> torch.Tensor:
    """softmax(q keys^T * scale [+ T5 bias]) values for a batch of spans: q [B, Tq, Hq, D], keys and
    values [B, Tk, Hkv, D], q_positions [B, Tq] and k_positions [B or 1, Tk] (the bias's distances),
    `allowed` [B, Tq, Tk] (None: every key). A query with no allowed key gets zeros. In q's dtype."""
    group = q.shape[2] // keys.shape[2]
    if group > 1:
        keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) * scale
    if bias is not None:
        distance = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_bucket(distance, False, bias.shape[0], max_distance)
        scores = scores + bias[buckets].permute(0, 3, 1, 2).float()
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, values.float()).to(q.dtype)


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    key_begin: torch.Tensor,
    key_end: torch.Tensor,
    layer: int,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None,
    max_distance: int,
    query_begin: torch.Tensor | None = None,
    query_end: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new queries over its cached keys at positions [key_begin, key_end).

    An encoder-decoder request keeps its cross-attention keys at cache positions [0, encoder length)
    and its decoder's own keys after them. `k`/`v` (self-attention) are written at `slot_mapping` first;
    cross-attention passes None. Queries sit at positions seq_len - num_new + j; `causal` hides later
    keys. `bias [num_buckets, Hq]`: T5's relative position bias, added by the unidirectional bucket of
    (key position - query position). `query_begin`/`query_end [T]` narrow each query's keys further; a query
    left with none gets zeros.
    """
    if k is not None and v is not None:
        write_kv(kv_cache, layer, k, v, slot_mapping)
    block_size = kv_cache.shape[3]
    key_pages, value_pages = kv_cache[layer, 0], kv_cache[layer, 1]
    out = q.new_zeros(q.shape[0], q.shape[1], kv_cache.shape[-1])
    starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
    begins, ends = key_begin.tolist(), key_end.tolist()
    for i, context_len in enumerate(lengths):
        first, last = starts[i], starts[i + 1]
        lo, hi = begins[i], ends[i]
        if last == first or hi <= lo:
            continue
        blocks = block_tables[i, : -(-hi // block_size)].long()
        keys = key_pages[blocks].flatten(0, 1)[lo:hi]
        values = value_pages[blocks].flatten(0, 1)[lo:hi]
        k_positions = torch.arange(lo, hi, device=q.device)[None]
        q_positions = torch.arange(context_len - (last - first), context_len, device=q.device)[None]
        allowed = k_positions[:, None, :] <= q_positions[:, :, None] if causal else None
        if query_begin is not None and query_end is not None:
            lo_q, hi_q = query_begin[None, first:last, None], query_end[None, first:last, None]
            inside = (k_positions[:, None, :] >= lo_q) & (k_positions[:, None, :] < hi_q)
            allowed = inside if allowed is None else allowed & inside
        out[first:last] = span_softmax(
            q[None, first:last], keys[None], values[None], q_positions, k_positions, allowed, scale, bias, max_distance
        )[0]
    return out
