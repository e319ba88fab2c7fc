"""A narrow (FP8 / int8) KV cache in the reference and CPU paged attention: each attends exactly as the
reference does on a float32 cache holding the keys and values the narrow one stands for (fresh random
inputs: a prompt chunk after a cached prefix, decode rows, a padding token)."""

import pytest
import torch
from attention_batches import make_batch

from kiln.kernels import cpu_attention, reference
from kiln.kernels.kv_quant import KV_CACHE_DTYPES, load, store

SHAPES = [(0, 9), (13, 5), (20, 1), (7, 1)]
SCALES = (0.013, 0.021)


@pytest.mark.parametrize("kv_dtype", list(KV_CACHE_DTYPES))
@pytest.mark.parametrize("attend", [reference.paged_attention, cpu_attention.paged_attention])
def test_narrow_cache_attends_as_the_values_it_stands_for(kv_dtype, attend):
    dtype = KV_CACHE_DTYPES[kv_dtype]
    batch = make_batch(SHAPES, 4, 2, 16, 4, torch.float32, "cpu", seed=3, padding_tokens=1)
    narrow = torch.stack(
        [torch.stack([store(batch.kv_cache[i, p] * 0.05, dtype, SCALES[p]) for p in (0, 1)]) for i in range(2)]
    )
    wide = torch.stack([torch.stack([load(narrow[i, p], SCALES[p], torch.float32) for p in (0, 1)]) for i in range(2)])
    q, k, v, _, *meta = batch.args()
    k, v = k * 0.05, v * 0.05  # inside the scales' range
    got = attend(q, k, v, narrow, *meta, 0.25, 0, 0.0, k_scale=SCALES[0], v_scale=SCALES[1])
    rounded_k = load(store(k, dtype, SCALES[0]), SCALES[0], torch.float32)
    rounded_v = load(store(v, dtype, SCALES[1]), SCALES[1], torch.float32)
    want = reference.paged_attention(q, rounded_k, rounded_v, wide, *meta, 0.25, 0, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    written = narrow[batch.layer, 0].flatten(0, 1)[batch.slot_mapping[:-1]]
    assert written.dtype == dtype and torch.equal(
        written.view(torch.uint8), store(k[:-1], dtype, SCALES[0]).view(torch.uint8)
    )
