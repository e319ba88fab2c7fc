"""The Triton greedy argmax against torch.argmax on fresh random logits (ties, NaN, -inf, ragged vocab).

Native on CUDA; without a GPU under triton's CPU interpreter (set by this folder's conftest).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels.argmax import argmax_rows  # noqa: E402
from kiln.kernels.selection import selected  # noqa: E402
from kiln.kernels.triton.argmax import CHUNK  # noqa: E402
from kiln.kernels.triton.argmax import argmax_rows as triton_argmax_rows  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if ON_GPU else [torch.float32, torch.float16]

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", [(1, 3 * CHUNK + 17), (5, CHUNK), (3, 100), (2, 128256 if ON_GPU else 5000)])
def test_matches_torch_argmax_with_ties(dtype, rows, vocab):
    g = torch.Generator().manual_seed(rows * 1000 + vocab)
    # Few distinct integer values: every row has its maximum many times, across chunks.
    logits = torch.randint(-50, 50, (rows, vocab), generator=g).to(dtype)
    want = torch.argmax(logits.float(), dim=-1)
    got = triton_argmax_rows(logits.to(DEVICE)).cpu()
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    # And continuous values (a unique maximum), as real logits are.
    logits = torch.randn(rows, vocab, generator=g).to(dtype)
    assert torch.equal(triton_argmax_rows(logits.to(DEVICE)).cpu(), torch.argmax(logits.float(), dim=-1))


def test_nan_inf_and_strided_rows():
    g = torch.Generator().manual_seed(7)
    vocab = 2 * CHUNK + 5
    logits = torch.randn(5, vocab, generator=g)
    logits[0, 3000] = float("nan")  # NaN beats everything, the first one wins
    logits[0, 4000] = float("nan")
    logits[0, 10] = float("inf")
    logits[1] = float("-inf")  # all -inf: index 0
    logits[2, CHUNK + 1] = float("inf")
    logits[2, 2 * CHUNK + 1] = float("inf")  # tie between chunks: the first
    logits[3, -1] = 1e9  # the last element of a ragged chunk
    want = torch.argmax(logits, dim=-1)
    got = triton_argmax_rows(logits.to(DEVICE)).cpu()
    assert torch.equal(got, want), (got, want)
    # A view of every other row (row stride > vocab) and of a padded buffer's prefix.
    padded = torch.randn(6, vocab + 64, generator=g)
    view = padded[::2, :vocab]
    got = triton_argmax_rows(padded.to(DEVICE)[::2, :vocab]).cpu()
    assert torch.equal(got, torch.argmax(view, dim=-1))


def test_dispatcher_takes_triton_only_on_cuda(monkeypatch):
    logits = torch.randn(3, 50)
    # On CPU the dispatcher is torch.argmax itself.
    assert torch.equal(argmax_rows(logits), torch.argmax(logits, dim=-1))
    assert torch.equal(triton_argmax_rows(torch.empty(0, 50, device=DEVICE)).cpu(), torch.empty(0, dtype=torch.int64))
    if ON_GPU:
        calls = []
        import kiln.kernels.triton.argmax as module

        real = module.argmax_rows
        monkeypatch.setattr(module, "argmax_rows", lambda x: calls.append(1) or real(x))
        assert torch.equal(argmax_rows(logits.cuda()).cpu(), torch.argmax(logits, dim=-1))
        assert calls == [1]
        with selected(argmax="reference"):
            assert torch.equal(argmax_rows(logits.cuda()).cpu(), torch.argmax(logits, dim=-1))
        assert calls == [1]
