"""The Triton paged-attention kernels on a narrow (FP8 E4M3 / int8) KV cache, against the reference.

The cache holds random keys and values already rounded with this layer's scales (never zeros); the
kernels must store new keys byte for byte as `reference.write_kv` does and attend as
`reference.paged_attention` does with the same scales. Without a GPU under the interpreter in fp32
(small shapes); on CUDA in bf16 too, through the op and inside a CUDA graph. Tolerances as
test_triton_attention's.
"""

from __future__ import annotations

import pytest
import torch
from attention_batches import Batch, make_batch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import kv_quant, reference  # noqa: E402
from kiln.kernels.triton import attention, decode, kv_write, prefill  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402
from kiln.kernels.w8a8_dispatch import fp8_supported  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
SCALES = (0.011, 0.023)  # k_scale, v_scale: randn / scale spans most of the FP8 range (|x| <= 448)
KV_DTYPES = [torch.float8_e4m3fn, torch.int8]
MIXED = [(0, 37), (45, 20), (70, 1), (30, 0), (0, 1), (16, 16)]
DECODE = [(300, 1), (5, 1), (0, 1), (129, 1)]

if not ON_GPU and not interpreting():
    pytest.skip("no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1", allow_module_level=True)


def scales_for(kv_dtype: torch.dtype) -> tuple[float, float]:
    return SCALES if kv_dtype == torch.float8_e4m3fn else (4.5 / 127, 3.5 / 127)  # int8: a few values clip


def narrow_batch(shapes, kv_dtype, dtype, seed, hq=4, hkv=2, block_size=16, padding=0) -> Batch:  # type: ignore[no-untyped-def]
    if kv_dtype == torch.float8_e4m3fn and ON_GPU and not fp8_supported(torch.device("cuda")):
        pytest.skip("an FP8 KV cache needs a GPU of compute capability 8.9+")
    batch = make_batch(shapes, hq, hkv, 32, block_size, dtype, DEVICE, seed=seed, padding_tokens=padding)
    k_scale, v_scale = scales_for(kv_dtype)
    plain = batch.kv_cache.cpu()  # rounded and stacked on the CPU, then moved (fewer float8 ops needed on CUDA)
    planes = (kv_quant.store(plain[:, 0], kv_dtype, k_scale), kv_quant.store(plain[:, 1], kv_dtype, v_scale))
    cache = torch.stack(planes, dim=1).to(DEVICE)
    return Batch(batch.q, batch.k, batch.v, cache, *batch.args()[4:])


def reference_run(batch: Batch, kv_dtype, scale, window, softcap):  # type: ignore[no-untyped-def]
    """(the reference's output from fp32 q/k/v, the cache after its write)."""
    cache = batch.kv_cache.clone()
    k_scale, v_scale = scales_for(kv_dtype)
    f = lambda t: t.float()  # noqa: E731
    out = reference.paged_attention(
        f(batch.q), f(batch.k), f(batch.v), cache, *batch.args()[4:], scale, window, softcap,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    return out, cache


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    got, ref = got.float().cpu(), ref.float().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    bad = err > tol + tol * ref.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3g} (tol {tol})"


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(kv_quant.as_bytes(a), kv_quant.as_bytes(b))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["fp8", "int8"])
def test_kv_write_stores_what_the_reference_stores(kv_dtype):
    batch = narrow_batch(MIXED, kv_dtype, DTYPES[-1], seed=1, padding=3)
    k = batch.k * 3  # some values past the range: saturated
    slots = batch.slot_mapping.clone()
    slots[::5] = -1
    expected, got = batch.kv_cache.clone(), batch.kv_cache.clone()
    reference.write_kv(expected, batch.layer, k, batch.v, slots, *scales_for(kv_dtype))
    kv_write.write_kv(got, batch.layer, k, batch.v, slots, *scales_for(kv_dtype))
    assert same_bytes(got, expected) and not same_bytes(got, batch.kv_cache)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["fp8", "int8"])
def test_prefill_reads_a_narrow_cache(kv_dtype):
    for dtype in DTYPES:
        batch = narrow_batch(MIXED, kv_dtype, dtype, seed=2, hq=8, block_size=32)
        ref, cache = reference_run(batch, kv_dtype, 32**-0.5, 40, 5.0)
        out = prefill.prefill_attention(
            batch.q, cache, *batch.args()[5:], 32**-0.5, 40, 5.0, torch.full_like(batch.q, float("nan")),
            kv_scales=scales_for(kv_dtype),
        )  # fmt: skip
        assert_close(out, ref, dtype, f"prefill {kv_dtype} {dtype}")


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["fp8", "int8"])
def test_decode_stores_and_reads_a_narrow_cache(kv_dtype):
    """The decode kernel attends to this step's keys as the cache will read them back, and stores them."""
    for dtype in DTYPES:
        batch = narrow_batch(DECODE, kv_dtype, dtype, seed=3, hq=8)
        ref, expected = reference_run(batch, kv_dtype, 0.3, -1, 0.0)
        out = decode.decode_attention(
            batch.q, batch.kv_cache, *batch.args()[5:], 0.3, -1, 0.0, torch.full_like(batch.q, float("nan")),
            num_splits=2, new_kv=(batch.k, batch.v, batch.slot_mapping), kv_scales=scales_for(kv_dtype),
        )  # fmt: skip
        assert same_bytes(batch.kv_cache, expected), "the cache differs from the reference write"
        assert_close(out, ref, dtype, f"decode {kv_dtype} {dtype}")


@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["fp8", "int8"])
def test_dispatcher_and_op_on_a_narrow_cache(kv_dtype):
    """paged_attention_triton (write + prefill for a mixed batch); on CUDA also the op itself, for decode."""
    batch = narrow_batch(MIXED, kv_dtype, DTYPES[-1], seed=4, padding=1)
    ref, expected = reference_run(batch, kv_dtype, 0.2, 25, 0.0)
    out = attention.paged_attention_triton(*batch.args(), 0.2, 25, 0.0, kv_scales=scales_for(kv_dtype))
    assert same_bytes(batch.kv_cache, expected)
    assert_close(out, ref, DTYPES[-1], "dispatcher")
    assert attention.unsupported_reason(batch.q, batch.k, batch.v, batch.kv_cache) is None
    if ON_GPU:
        batch = narrow_batch(DECODE, kv_dtype, torch.bfloat16, seed=5, hq=8)
        ref, expected = reference_run(batch, kv_dtype, 0.125, -1, 0.0)
        k_scale, v_scale = scales_for(kv_dtype)
        out = torch.ops.kiln.paged_attention(*batch.args(), 0.125, -1, 0.0, k_scale=k_scale, v_scale=v_scale)
        assert same_bytes(batch.kv_cache, expected)
        assert_close(out, ref, torch.bfloat16, "op")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kv_dtype", KV_DTYPES, ids=["fp8", "int8"])
def test_narrow_cache_in_a_cuda_graph(kv_dtype):
    """The scales are launch constants: replays with new queries and keys follow the reference."""
    shapes = [(100, 1), (3000, 1), (17, 1)]
    static = narrow_batch(shapes, kv_dtype, torch.bfloat16, seed=11, hq=32, hkv=8)
    kv_scales = scales_for(kv_dtype)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        attention.paged_attention_triton(*static.clone().args(), 0.088, -1, 0.0, kv_scales=kv_scales)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_triton(*static.args(), 0.088, -1, 0.0, kv_scales=kv_scales)
    for step in range(2):
        fresh = narrow_batch([(c + step, 1) for c, _ in shapes], kv_dtype, torch.bfloat16, seed=20 + step, hq=32, hkv=8)
        fresh.kv_cache.copy_(static.kv_cache)
        for name in ("q", "k", "v", "slot_mapping", "seq_lens", "block_tables", "query_start_loc"):
            getattr(static, name).copy_(getattr(fresh, name))
        ref, _ = reference_run(fresh, kv_dtype, 0.088, -1, 0.0)
        graph.replay()
        assert_close(out, ref, torch.bfloat16, f"graph replay {step}")
