"""kiln::paged_attention against dense attention over contiguous keys, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

import kiln.kernels  # noqa: F401


def dense_attention(q, k, v, scale, window, softcap):
    """One sequence, all of its keys contiguous; queries are the last q.shape[0] positions."""
    n_q, n_k = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1).transpose(0, 1).double()
    v = v.repeat_interleave(group, 1).transpose(0, 1).double()
    s = (q.transpose(0, 1).double() @ k.transpose(1, 2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(n_k - n_q, n_k)[:, None]
    kpos = torch.arange(n_k)[None, :]
    ok = kpos <= qpos
    if window > 0:
        ok &= kpos > qpos - window
    s = s.masked_fill(~ok, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(0, 1)


def scatter_into_cache(cache, layer, keys, values, table, block_size):
    for pos in range(keys.shape[0]):
        block, off = table[pos // block_size], pos % block_size
        cache[layer, 0, block, off] = keys[pos]
        cache[layer, 1, block, off] = values[pos]


@pytest.mark.parametrize("hq,hkv,window,softcap", [(4, 4, -1, 0.0), (8, 2, -1, 0.0), (4, 1, 5, 0.0), (4, 2, 6, 30.0)])
def test_mixed_prefill_chunk_and_decode(hq, hkv, window, softcap):
    torch.manual_seed(hq * 100 + hkv * 10 + window)
    d, bs, layers, layer = 16, 4, 3, 1
    # (cached tokens, new tokens): a fresh prompt, a chunk continuing a cached prefix, a decode step
    shapes = [(0, 7), (9, 5), (12, 1)]
    num_blocks = 32
    cache = torch.randn(layers, 2, num_blocks, bs, hkv, d)  # garbage everywhere else must be ignored
    perm = torch.randperm(num_blocks).tolist()
    tables, full_k, full_v, qs, ks, vs, slots = [], [], [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [perm.pop() for _ in range(math.ceil(total / bs))]
        tables.append(table)
        k_all, v_all = torch.randn(total, hkv, d), torch.randn(total, hkv, d)
        scatter_into_cache(cache, layer, k_all[:cached], v_all[:cached], table, bs)
        full_k.append(k_all)
        full_v.append(v_all)
        qs.append(torch.randn(new, hq, d))
        ks.append(k_all[cached:])
        vs.append(v_all[cached:])
        slots += [table[p // bs] * bs + p % bs for p in range(cached, total)]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in shapes], dtype=torch.int32)
    starts = torch.tensor([0] + torch.tensor([n for _, n in shapes]).cumsum(0).tolist(), dtype=torch.int32)
    scale = d**-0.5
    out = torch.ops.kiln.paged_attention(
        torch.cat(qs),
        torch.cat(ks),
        torch.cat(vs),
        cache,
        torch.tensor(slots),
        block_tables,
        seq_lens,
        starts,
        layer,
        scale,
        window,
        softcap,
    )
    for i in range(len(shapes)):
        ref = dense_attention(qs[i], full_k[i], full_v[i], scale, window, softcap)
        got = out[starts[i] : starts[i + 1]]
        assert torch.allclose(got.double(), ref, atol=1e-5), (
            f"sequence {i} differs by {(got.double() - ref).abs().max()}"
        )
    # the new keys and values landed in their slots of the right layer
    flat_k = cache[layer, 0].flatten(0, 1)
    assert torch.equal(flat_k[torch.tensor(slots)], torch.cat(ks))


def test_negative_slots_are_not_written():
    torch.manual_seed(1)
    cache = torch.randn(1, 2, 4, 4, 2, 8)
    before = cache.clone()
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    kiln.kernels.reference.write_kv(cache, 0, k, v, torch.tensor([-1, 5]))
    changed = (cache != before).flatten(0, 3).any(-1).any(-1).nonzero().flatten().tolist()
    assert torch.equal(cache[0, 0].flatten(0, 1)[5], k[1])
    assert len(changed) == 2  # slot 5 of keys and of values, nothing for the skipped token
