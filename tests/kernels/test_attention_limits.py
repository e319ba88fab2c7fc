"""The Triton path of `kiln::paged_attention_limits` (per-query key bounds) against the reference.

Image blocks (runs of tokens that see their whole block) are placed across tile, cache-page and
chunk boundaries: a block may begin in a sequence's cached prefix and end among its new tokens.
Fresh random inputs per case; fp32 under the CPU interpreter, bf16 too on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from attention_batches import Batch, make_batch

triton = pytest.importorskip("triton", reason="triton is not installed")

import kiln.kernels  # noqa: E402, F401  (registers the ops)
from kiln.kernels import reference  # noqa: E402
from kiln.kernels.triton import attention, prefill  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

if not ON_GPU and not interpreting():
    pytest.skip("no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1", allow_module_level=True)

# name: ((cached, new) per sequence, image blocks (start, end) per sequence in absolute positions)
CASES = {
    "one prompt, two images": ([(0, 70)], [[(3, 40), (45, 66)]]),
    "image crossing the chunk start": ([(30, 40), (0, 9)], [[(20, 50)], [(2, 9)]]),
    "image ending the chunk, decode row beside": ([(0, 33), (50, 1), (16, 40)], [[(1, 33)], [], [(17, 56)]]),
    "no image (causal)": ([(10, 25), (0, 17)], [[], []]),
}


def limits_for(shapes: list[tuple[int, int]], blocks: list[list[tuple[int, int]]], padding: int) -> torch.Tensor:
    """attend_end of every packed query: its block's end inside an image block, else position + 1."""
    out: list[int] = []
    for (cached, new), seq_blocks in zip(shapes, blocks):
        for p in range(cached, cached + new):
            end = next((stop for first, stop in seq_blocks if first <= p < stop), p + 1)
            assert end <= cached + new, "a block must end among the step's tokens"
            out.append(end)
    return torch.tensor(out + [1] * padding, dtype=torch.int64)


def reference_output(batch: Batch, limits: torch.Tensor, scale: float, window: int, softcap: float) -> torch.Tensor:
    fp32 = batch.to(torch.float32).clone()
    return reference.paged_attention(*fp32.args(), scale, window, softcap, attend_end=limits.to(fp32.q.device))


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    got, ref = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    bad = err > tol + tol * ref.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("hq,hkv,block_size,window,softcap", [(4, 2, 16, -1, 0.0), (8, 2, 8, 24, 10.0)])
def test_prefill_kernel_with_limits(dtype, name, hq, hkv, block_size, window, softcap):
    shapes, blocks = CASES[name]
    padding = 3
    batch = make_batch(shapes, hq, hkv, 32, block_size, dtype, DEVICE, seed=len(name) + hq, padding_tokens=padding)
    limits = limits_for(shapes, blocks, padding).to(DEVICE)
    ref = reference_output(batch, limits, 0.2, window, softcap)
    reference.write_kv(batch.kv_cache, batch.layer, batch.k, batch.v, batch.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    for block_m in (16, 64):  # tiles of 4 and 16 tokens: image blocks cross tile edges
        config = prefill.PrefillConfig(block_m, 16, 4, 2)
        got = prefill.prefill_attention(
            batch.q, batch.kv_cache, *batch.args()[5:], 0.2, window, softcap, out, config, attend_end=limits
        )
        assert_close(got, ref, dtype, f"{name}, BLOCK_M {block_m}")
    image_rows = limits != torch.arange(1, limits.numel() + 1, device=DEVICE)  # not a plain causal bound?
    causal = reference_output(batch, limits_for(shapes, [[] for _ in shapes], padding).to(DEVICE), 0.2, window, softcap)
    if any(blocks):
        assert image_rows.any()
        assert not torch.allclose(causal.float().cpu(), ref.float().cpu()), "the limits changed nothing"


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatcher_with_limits_writes_then_attends(dtype):
    """Mixed step: the prefill kernel with limits; decode step (one token each): the decode kernels,
    whose causal bound p + 1 is every decode row's limit."""
    for shapes, blocks in (CASES["image crossing the chunk start"], ([(40, 1), (7, 1), (0, 1)], [[], [], []])):
        batch = make_batch(shapes, 4, 2, 32, 16, dtype, DEVICE, seed=len(shapes))
        limits = limits_for(shapes, blocks, 0).to(DEVICE)
        expected = batch.clone()
        reference.write_kv(expected.kv_cache, expected.layer, expected.k, expected.v, expected.slot_mapping)
        ref = reference_output(batch, limits, 0.2, -1, 0.0)
        out = attention.paged_attention_triton(*batch.args(), 0.2, -1, 0.0, attend_end=limits)
        assert torch.equal(batch.kv_cache, expected.kv_cache)
        assert_close(out, ref, dtype, f"dispatch {shapes}")


@pytest.mark.skipif(not ON_GPU, reason="the op takes the Triton path on CUDA tensors only")
def test_op_on_cuda_takes_triton_without_host_sync():
    shapes, blocks = CASES["one prompt, two images"]
    batch = make_batch(shapes, 8, 2, 64, 16, torch.bfloat16, DEVICE, seed=9)
    limits = limits_for(shapes, blocks, 0).to(DEVICE)
    ref = reference_output(batch, limits, 0.125, -1, 0.0)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = torch.ops.kiln.paged_attention_limits(*batch.args()[:8], limits, batch.layer, 0.125, -1, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(out, ref, torch.bfloat16, "torch.ops.kiln.paged_attention_limits")
