"""The decode graph's first kernel: input ids taken from tokens sampled on the device, against
`kiln.kernels.reference.take_sampled` on fresh random ids. Native on CUDA; without a GPU under
triton's CPU interpreter (set by this folder's conftest)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton.take_tokens import BLOCK, take_sampled_  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402
from kiln.runtime.in_flight import take_sampled_ as dispatch_take  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


@pytest.mark.parametrize("n", [1, 7, BLOCK + 3])
def test_takes_exactly_the_rows_with_a_source(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 50000, (n,), generator=g)
    sampled = torch.randint(0, 50000, (n + 5,), generator=g)
    sources = torch.randint(-1, n + 5, (n,), generator=g)  # about one row in n + 6 keeps its id
    sources[0] = -1
    want = reference.take_sampled(ids, sources, sampled)
    assert torch.equal(want[0], ids[0]) and torch.equal(want[sources >= 0], sampled[sources[sources >= 0]])
    got = ids.to(DEVICE)
    assert take_sampled_(got, sources.to(DEVICE), sampled.to(DEVICE)) is got
    assert torch.equal(got.cpu(), want)
    on_cpu = ids.clone()
    assert torch.equal(dispatch_take(on_cpu, sources, sampled), want)  # the dispatcher's PyTorch path
    assert torch.equal(on_cpu, want)


def test_no_rows():
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert take_sampled_(empty, empty.clone(), torch.zeros(4, dtype=torch.int64, device=DEVICE)) is empty
