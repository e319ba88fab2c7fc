"""The Triton paged-attention kernels against the PyTorch reference, on fresh random inputs.

On CUDA the kernels run natively (fp32, bf16 and fp16, larger shapes too); without a GPU they run
under triton's CPU interpreter (TRITON_INTERPRET=1, set by this folder's conftest) in fp32 with
small shapes. Tolerances, max |got - ref| <= atol + rtol * |ref| against the reference run in fp32
on the same inputs: fp32 1e-4 + 1e-4 (tensor-core "ieee" fp32 dots), bf16 2e-2 + 2e-2, fp16
4e-3 + 4e-3 (the kernel rounds the softmax weights to the input dtype before the PV product).
"""

from __future__ import annotations

import pytest
import torch
from attention_batches import Batch, make_batch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kiln.kernels import paged_attention as op_module  # noqa: E402
from kiln.kernels import reference  # noqa: E402
from kiln.kernels.selection import selected  # noqa: E402
from kiln.kernels.triton import attention, decode, decode_merge, kv_write, prefill  # noqa: E402
from kiln.kernels.triton.tile import interpreting  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}

if not ON_GPU and not interpreting():
    pytest.skip(
        "no GPU, and kiln.kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True
    )

# (cached tokens, new tokens) per sequence: a fresh prompt, a chunk continuing a cached prefix,
# a decode row, a sequence with no new tokens, a one-token prompt, a chunk starting on a block edge
MIXED = [(0, 37), (45, 20), (70, 1), (30, 0), (0, 1), (16, 16)]
DECODE = [(300, 1), (5, 1), (0, 1), (129, 1)]


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    got, ref = got.float().cpu(), ref.float().cpu()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten or poisoned element?)"
    err = (got - ref).abs()
    bad = err > tol + tol * ref.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3g} (tol {tol})"


def reference_output(batch: Batch, scale: float, window: int, softcap: float) -> torch.Tensor:
    """The reference on fp32 copies (it writes the new keys into its own copy of the cache)."""
    return reference.paged_attention(*batch.to(torch.float32).args(), scale, window, softcap)


def written(batch: Batch) -> Batch:
    """The batch with its new keys/values already stored (what the attention kernels expect)."""
    batch = batch.clone()
    reference.write_kv(batch.kv_cache, batch.layer, batch.k, batch.v, batch.slot_mapping)
    return batch


def poisoned_out(batch: Batch) -> torch.Tensor:
    return torch.full_like(batch.q, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", [(16, 32), (32, 16), (4, 24)])
def test_kv_write_matches_reference(dtype, block_size, head_dim):
    batch = make_batch(MIXED, 4, 2, head_dim, block_size, dtype, DEVICE, seed=block_size, padding_tokens=3)
    # non-contiguous k and v, as when they are views into a fused projection
    wide = torch.randn(batch.k.shape[0], 2, batch.k.shape[1], head_dim, device=DEVICE).to(dtype)
    k, v = wide[:, 0], wide[:, 1]
    slots = batch.slot_mapping.clone()
    slots[::5] = -1  # more skipped tokens, among real ones
    expected, got = batch.kv_cache.clone(), batch.kv_cache.clone()
    reference.write_kv(expected, batch.layer, k, v, slots)
    kv_write.write_kv(got, batch.layer, k, v, slots)
    assert torch.equal(got, expected), "the Triton write differs from the reference write"
    assert not torch.equal(got, batch.kv_cache), "nothing was written"


PREFILL_CASES = [  # num_q_heads, num_kv_heads, block_size, window, softcap
    (2, 2, 16, -1, 0.0),
    (4, 2, 16, 13, 0.0),
    (8, 2, 32, -1, 20.0),
    (4, 1, 32, 40, 5.0),
    (6, 2, 16, -1, 0.0),  # a group of 3 heads: padded to 4 rows per token
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,block_size,window,softcap", PREFILL_CASES)
def test_prefill_kernel(dtype, hq, hkv, block_size, window, softcap):
    batch = written(make_batch(MIXED, hq, hkv, 32, block_size, dtype, DEVICE, seed=hq + block_size + window))
    scale = 32**-0.5
    out = prefill.prefill_attention(
        batch.q, batch.kv_cache, *batch.args()[5:], scale, window, softcap, poisoned_out(batch)
    )
    assert_close(out, reference_output(batch, scale, window, softcap), dtype, "prefill")


DECODE_CASES = [  # num_q_heads, num_kv_heads, block_size, window, softcap, num_splits (None: by shape)
    (2, 2, 16, -1, 0.0, 1),
    (4, 2, 16, -1, 0.0, 4),
    (8, 2, 32, 70, 0.0, 2),
    (8, 2, 16, -1, 30.0, None),
    (4, 1, 32, 200, 10.0, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,block_size,window,softcap,splits", DECODE_CASES)
def test_decode_kernel(dtype, hq, hkv, block_size, window, softcap, splits):
    batch = written(make_batch(DECODE, hq, hkv, 32, block_size, dtype, DEVICE, seed=hq * 7 + block_size))
    scale = 0.3
    out = decode.decode_attention(
        batch.q, batch.kv_cache, *batch.args()[5:], scale, window, softcap, poisoned_out(batch), num_splits=splits
    )
    assert_close(out, reference_output(batch, scale, window, softcap), dtype, f"decode with {splits} splits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,block_size,window,softcap,splits", DECODE_CASES)
@pytest.mark.parametrize("early", [True, False])
def test_decode_kernel_storing_the_new_keys(dtype, hq, hkv, block_size, window, softcap, splits, early):
    """new_kv: the kernel attends to this step's keys from k/v and stores them, as write_kv would
    (with its first key tile read before the wait, and after it)."""
    batch = make_batch(DECODE, hq, hkv, 32, block_size, dtype, DEVICE, seed=hq * 5 + block_size)
    expected = written(batch)
    ref = reference_output(batch, 0.3, window, softcap)
    out = decode.decode_attention(
        batch.q, batch.kv_cache, *batch.args()[5:], 0.3, window, softcap, poisoned_out(batch),
        num_splits=splits, new_kv=(batch.k, batch.v, batch.slot_mapping), early_keys=early,
    )  # fmt: skip
    assert torch.equal(batch.kv_cache, expected.kv_cache), "the cache differs from write_kv's"
    assert_close(out, ref, dtype, f"decode storing its keys, {splits} splits")


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("budget", [decode.PREFETCH_BYTES, 0, 8 << 20])
def test_decode_with_a_weight_to_prefetch_gives_the_same_result(splits, budget):
    """prefetch: the merge kernel's programs first ask for up to `prefetch_bytes` of a weight's lines
    in L2 (a hint on CUDA, nothing under the interpreter): the attention output and the cache must
    not change."""
    batch = make_batch(DECODE, 8, 2, 32, 16, DTYPES[0], DEVICE, seed=splits)
    weights = (
        torch.randn(300, 64, dtype=DTYPES[0], device=DEVICE),
        torch.randn(70, 33, dtype=DTYPES[0], device=DEVICE),
    )
    outs = []
    for prefetch in ((), weights):
        copy = batch.clone()
        outs.append(
            decode.decode_attention(
                copy.q,
                copy.kv_cache,
                *copy.args()[5:],
                0.3,
                -1,
                0.0,
                poisoned_out(copy),
                num_splits=splits,
                new_kv=(copy.k, copy.v, copy.slot_mapping),
                prefetch=prefetch,
                prefetch_bytes=budget,
            )  # fmt: skip
        )
        outs.append(copy.kv_cache)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_prefetch_takes_the_first_weight_first_within_the_budget():
    mb = 1 << 20
    assert decode_merge.prefetch_lines([], 16 * mb) == (0, 0)
    assert decode_merge.prefetch_lines([8 * mb], 16 * mb) == (8 * mb // 128, 8 * mb // 128)
    assert decode_merge.prefetch_lines([8 * mb, 64 * mb], 16 * mb) == (8 * mb // 128, 16 * mb // 128)  # o, then gate/up
    assert decode_merge.prefetch_lines([32 * mb, 64 * mb], 16 * mb) == (16 * mb // 128, 16 * mb // 128)  # o alone
    assert decode_merge.prefetch_lines([300, 4620], 16 * mb) == (2, 2 + 36)  # whole lines only


DISPATCH_CASES = {
    "mixed": (MIXED, 0),  # T != B: the prefill kernel
    "decode": (DECODE, 0),  # T == B: the decode kernels
    "uneven, T == B": ([(10, 0), (20, 2), (33, 1)], 0),  # decode kernels with 0 and 2 new tokens
    "padding tokens": ([(40, 3), (7, 1)], 5),  # slots -1 past the last sequence: rows of zeros
    "decode + padding": ([(40, 1), (7, 1)], 0),
    "T == B with a padding token": ([(10, 0), (5, 1), (3, 1)], 1),
    "T == B, a prompt of two": ([(0, 2), (9, 0)], 0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DISPATCH_CASES)
def test_dispatcher_writes_then_attends(dtype, name):
    shapes, padding = DISPATCH_CASES[name]
    batch = make_batch(shapes, 4, 2, 32, 16, dtype, DEVICE, seed=len(name), padding_tokens=padding)
    expected = batch.clone()
    reference.write_kv(expected.kv_cache, expected.layer, expected.k, expected.v, expected.slot_mapping)
    ref = reference_output(batch, 0.2, 25, 0.0)  # on fp32 copies, before the call mutates the cache
    out = attention.paged_attention_triton(*batch.args(), 0.2, 25, 0.0)
    assert torch.equal(batch.kv_cache, expected.kv_cache), "the cache after the call differs from the reference's"
    assert_close(out, ref, dtype, name)


def test_split_count_comes_from_shapes():
    device = torch.device(DEVICE)
    target = 2 * decode._multiprocessors(device)
    assert decode.choose_splits(1, 8, 64, device) == 1  # too short to split
    assert decode.choose_splits(1, 1, 1 << 20, device) == min(decode.MAX_SPLITS, triton.next_power_of_2(target))
    for tokens in (1, 3, 8, target, 4 * target):
        splits = decode.choose_splits(tokens, 2, 1 << 20, device)
        assert splits & (splits - 1) == 0, f"{splits} splits is not a power of two"
        programs = tokens * 2 * splits
        assert programs >= target or splits == decode.MAX_SPLITS, f"{tokens} tokens: too few programs"
        assert splits == 1 or programs // 2 < target, f"{tokens} tokens: {splits} splits is more than needed"
    # the longest possible context bounds the splits: none shorter than MIN_KEYS_PER_SPLIT
    assert decode.choose_splits(1, 1, 4 * decode.MIN_KEYS_PER_SPLIT, device) == 4


def test_unsupported_inputs_are_named():
    q, kv = torch.randn(2, 4, 24), torch.randn(1, 2, 4, 16, 2, 24)
    assert "power of two" in attention.unsupported_reason(q, q[:, :2], q[:, :2], kv)
    q, kv = torch.randn(2, 4, 32), torch.randn(1, 2, 4, 16, 2, 32)
    assert attention.unsupported_reason(q, q[:, :2], q[:, :2], kv) is None
    assert "dtype" in attention.unsupported_reason(q, q[:, :2], q[:, :2], kv.half())
    with pytest.raises(AssertionError, match="power of two"):
        attention.paged_attention_triton(
            torch.randn(1, 4, 24), torch.randn(1, 2, 24), torch.randn(1, 2, 24), torch.randn(1, 2, 4, 16, 2, 24),
            torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), 0, 1.0, -1, 0.0,
        )  # fmt: skip


def test_op_routes_by_device_and_kernel_selection():
    assert not op_module.use_triton(torch.randn(1, 1, 16))  # CPU tensors: the reference
    if ON_GPU:
        assert op_module.use_triton(torch.randn(1, 1, 16, device="cuda"))
        with selected(attention="reference"):
            assert not op_module.use_triton(torch.randn(1, 1, 16, device="cuda"))


@pytest.mark.skipif(not ON_GPU, reason="the op takes the Triton path on CUDA tensors only")
@pytest.mark.parametrize("shapes", [MIXED, DECODE], ids=["mixed", "decode"])
def test_op_on_cuda_uses_triton(monkeypatch, shapes):
    calls = []
    real = attention.paged_attention_triton

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    import kiln.kernels.triton as package

    monkeypatch.setattr(package, "paged_attention_triton", counting)
    batch = make_batch(shapes, 8, 2, 64, 16, torch.bfloat16, DEVICE, seed=3)
    ref = reference_output(batch, 0.125, -1, 0.0)
    out = torch.ops.kiln.paged_attention(*batch.args(), 0.125, -1, 0.0)
    assert calls, "the op did not call the Triton kernels"
    assert_close(out, ref, torch.bfloat16, "torch.ops.kiln.paged_attention")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_capturable_in_cuda_graph():
    """Capture fails on any host synchronisation; replays must follow new metadata values."""
    shapes = [(100, 1), (3000, 1), (17, 1)]
    batch = make_batch(shapes, 32, 8, 128, 16, torch.bfloat16, DEVICE, seed=11)
    static = batch.clone()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        attention.paged_attention_triton(*static.clone().args(), 0.088, -1, 0.0)  # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.paged_attention_triton(*static.args(), 0.088, -1, 0.0)
    for step in range(2):  # the next decode steps: one more token each, new query and keys
        fresh = make_batch([(c + step, 1) for c, _ in shapes], 32, 8, 128, 16, torch.bfloat16, DEVICE, seed=20 + step)
        fresh.kv_cache.copy_(static.kv_cache)
        for name in ("q", "k", "v", "slot_mapping", "seq_lens", "block_tables", "query_start_loc"):
            getattr(static, name).copy_(getattr(fresh, name))
        ref = reference_output(fresh.clone(), 0.088, -1, 0.0)
        graph.replay()
        assert_close(out, ref, torch.bfloat16, f"graph replay {step}")


@pytest.mark.skipif(not ON_GPU, reason="large shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_like_shapes_on_gpu(dtype):
    shapes = [(0, 300), (1000, 200), (4000, 1), (2500, 0), (64, 64)]
    batch = make_batch(shapes, 32, 8, 128, 16, dtype, DEVICE, seed=5)
    ref = reference_output(batch, 128**-0.5, -1, 0.0)
    assert_close(attention.paged_attention_triton(*batch.args(), 128**-0.5, -1, 0.0), ref, dtype, "llama prefill")
    decode_batch = make_batch([(4000, 1), (10, 1), (2047, 1)], 32, 8, 128, 16, dtype, DEVICE, seed=6)
    ref = reference_output(decode_batch, 128**-0.5, 1024, 0.0)
    out = attention.paged_attention_triton(*decode_batch.args(), 128**-0.5, 1024, 0.0)
    assert_close(out, ref, dtype, "llama decode, window 1024")


def test_reference_write_skips_negative_slots_next_to_slot_zero():
    torch.manual_seed(4)
    cache = torch.randn(2, 2, 3, 4, 2, 8)
    before = cache.clone()
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    reference.write_kv(cache, 1, k, v, torch.tensor([-1, 0, -3, 7]))
    flat_k, flat_v = cache[1, 0].flatten(0, 1), cache[1, 1].flatten(0, 1)
    assert torch.equal(flat_k[0], k[1]) and torch.equal(flat_v[7], v[3])
    unchanged = torch.ones(12, dtype=torch.bool)
    unchanged[[0, 7]] = False
    assert torch.equal(flat_k[unchanged], before[1, 0].flatten(0, 1)[unchanged])
    assert torch.equal(cache[0], before[0])
    reference.write_kv(cache, 1, k, v, torch.tensor([-1, -1, 5, -2]))  # slot 0 keeps its value
    assert torch.equal(flat_k[0], k[1]) and torch.equal(flat_k[5], k[2])
    reference.write_kv(cache, 1, k[:0], v[:0], torch.zeros(0, dtype=torch.int64))  # no tokens: no-op
