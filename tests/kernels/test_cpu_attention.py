"""The CPU path of paged attention (`kiln.kernels.cpu_attention`) against the PyTorch reference.

Fresh random inputs: prompt chunks, decode rows, sequences with no new tokens, padding tokens,
grouped heads, sliding windows, per-query bounds (`attend_end`), float32 and bfloat16. The
reference runs on float32 copies; tolerance max |got - ref| <= tol + tol * |ref| with tol 1e-5 in
float32 and 2e-2 in bfloat16 (the output is rounded to bfloat16, as the reference rounds it).
"""

from __future__ import annotations

import pytest
import torch
from attention_batches import make_batch

import kiln.kernels  # noqa: F401  (registers the ops)
from kiln.kernels import cpu_attention, reference
from kiln.kernels.paged_attention import use_cpu_path
from kiln.kernels.selection import selected

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
MIXED = [(0, 37), (45, 20), (70, 1), (30, 0), (0, 1), (16, 16)]
DECODE = [(300, 1), (5, 1), (0, 1), (129, 1)]
HEADS = [(4, 4), (8, 2), (6, 1)]


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert got.shape == ref.shape and got.dtype == dtype
    err = (got.float() - ref).abs()
    assert not (err > tol + tol * ref.abs()).any(), f"max error {err.max().item():.3g} (tol {tol})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [-1, 5])
@pytest.mark.parametrize("hq,hkv", HEADS)
@pytest.mark.parametrize("shapes,padding", [(MIXED, 0), (MIXED, 3), (DECODE, 0), (DECODE, 2)])
def test_against_reference(shapes, padding, hq, hkv, window, dtype):
    batch = make_batch(shapes, hq, hkv, 16, 16, dtype, "cpu", seed=hq + len(shapes), padding_tokens=padding)
    fp32 = batch.to(torch.float32).clone()
    ref = reference.paged_attention(*fp32.args(), 0.25, window, 0.0)
    got = cpu_attention.paged_attention(*batch.args(), 0.25, window, 0.0)
    assert_close(got, ref, dtype)
    assert torch.equal(batch.kv_cache.float(), fp32.kv_cache), "the new keys/values differ from the reference's"
    if padding:
        assert not got[-padding:].any(), "rows of no sequence must stay zero, as in the reference"


@pytest.mark.parametrize("shapes", [[(0, 3)], MIXED, DECODE])
def test_the_output_is_contiguous_for_head_major_queries(shapes):
    """A compiled program asserts the op's fake layout (contiguous); queries sliced from a fused projection
    (GPT-NeoX) come head-major, and SDPA gives its output their layout."""
    batch = make_batch(shapes, 4, 4, 16, 16, torch.float32, "cpu", seed=5)
    ref = reference.paged_attention(*batch.clone().args(), 0.25, -1, 0.0)
    args = list(batch.args())
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    got = cpu_attention.paged_attention(*args, 0.25, -1, 0.0)
    assert_close(got, ref, torch.float32)
    assert got.is_contiguous()


@pytest.mark.parametrize("window", [-1, 24])
def test_attend_end(window):
    """Per-query bounds: image tokens that see their whole image, text rows causal, a decode row."""
    shapes = [(0, 33), (50, 1), (16, 40)]
    batch = make_batch(shapes, 8, 2, 32, 8, torch.float32, "cpu", seed=7, padding_tokens=2)
    blocks = [[(1, 33)], [], [(17, 56)]]
    ends = []
    for (cached, new), seq_blocks in zip(shapes, blocks):
        ends += [next((b for a, b in seq_blocks if a <= p < b), p + 1) for p in range(cached, cached + new)]
    limits = torch.tensor(ends + [1, 1])
    fp32 = batch.clone()
    ref = reference.paged_attention(*fp32.args(), 0.2, window, 0.0, attend_end=limits)
    got = cpu_attention.paged_attention(*batch.args(), 0.2, window, 0.0, attend_end=limits)
    assert_close(got, ref, torch.float32)


def test_layers_of_one_step_share_a_plan_and_a_changed_step_gets_its_own():
    """Layers with other windows reuse the step's plan; metadata changed in place gives a new plan."""
    batch = make_batch(MIXED, 8, 2, 16, 16, torch.float32, "cpu", seed=11, num_layers=3, padding_tokens=1)
    for layer, window in ((0, -1), (1, 5), (2, -1)):
        fp32 = batch.clone()
        args = (fp32.q, fp32.k, fp32.v, fp32.kv_cache, *fp32.args()[4:8], layer)
        ref = reference.paged_attention(*args, 0.25, window, 0.0)
        args = (batch.q, batch.k, batch.v, batch.kv_cache, *batch.args()[4:8], layer)
        assert_close(cpu_attention.paged_attention(*args, 0.25, window, 0.0), ref, torch.float32)
    batch.block_tables[2, 0] = batch.block_tables[0, 1]  # the same tensor, another block for the decode row
    fp32 = batch.clone()
    ref = reference.paged_attention(*fp32.args(), 0.25, -1, 0.0)
    assert_close(cpu_attention.paged_attention(*batch.args(), 0.25, -1, 0.0), ref, torch.float32)


def test_softcap_keeps_the_reference():
    batch = make_batch(MIXED, 4, 2, 16, 16, torch.float32, "cpu", seed=3)
    fp32 = batch.clone()
    ref = reference.paged_attention(*fp32.args(), 0.25, -1, 30.0)
    assert torch.equal(cpu_attention.paged_attention(*batch.args(), 0.25, -1, 30.0), ref)


def test_the_op_takes_the_cpu_path_unless_the_reference_is_selected():
    q = torch.zeros(1, 2, 4)
    assert use_cpu_path(q)
    with selected(attention="reference"):
        assert not use_cpu_path(q)
    batch = make_batch(DECODE, 4, 2, 16, 16, torch.float32, "cpu", seed=5)
    fp32 = batch.clone()
    got = torch.ops.kiln.paged_attention(*batch.args(), 0.25, -1, 0.0)
    assert_close(got, reference.paged_attention(*fp32.args(), 0.25, -1, 0.0), torch.float32)
