"""A decode step's packed inputs: the one-token fast path (`ModelRunner._prepare_decode`, host lists through
`array`) gives the tensors of the general path, for ragged block tables and sequences still in their prompt."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.model_runner import ModelRunner, host_tensor
from kiln.runtime.scheduler import ScheduledChunk
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams


def test_decode_fast_path_equals_the_packed_path():
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    runner = ModelRunner(None, torch.zeros(1), kv, torch.device("cpu"))  # type: ignore[arg-type]
    chunks = []
    for i, (prompt, generated) in enumerate([(3, 0), (12, 5), (7, 1), (1, 9)]):
        seq = Sequence(f"r{i}", list(range(10, 10 + prompt)), SamplingParams(max_tokens=16))
        seq.output_ids = list(range(40, 40 + generated))
        assert kv.allocate(seq.request_id, seq.num_tokens)
        chunks.append(ScheduledChunk(seq, seq.num_tokens - 1, 1))
    fast, fast_sampled = runner.prepare(chunks)
    packed, packed_sampled = runner._prepare_packed(chunks)
    assert fast_sampled == packed_sampled == [0, 1, 2, 3]
    assert len(fast) == len(packed) == 8 and fast[7] is runner.kv_cache
    for got, want in zip(fast[:7], packed[:7], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert fast[3].shape == (4, 5), "block tables padded to the widest (r1: 17 tokens, 5 blocks of 4)"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_host_tensor_is_torch_tensor(dtype):
    for values in ([], [7], [0, -3, 2**31 - 1, 5]):
        got = host_tensor(values, dtype, torch.device("cpu"))
        want = torch.tensor(values, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
