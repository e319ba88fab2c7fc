"""Each graph pass on a captured tiny model: outputs before and after agree, checks refuse bad graphs."""

from __future__ import annotations

import pytest
import torch
from capture_tiny import capture_tiny

import kiln.kernels  # noqa: F401
from kiln.compiler.passes import PASSES, PassContext, PassResult, active_passes, describe
from kiln.compiler.passes.check_attention_captured import check_attention_captured
from kiln.compiler.passes.check_attention_rewritten import check_attention_rewritten
from kiln.compiler.passes.context import nodes_calling
from kiln.compiler.passes.paged_attention import paged_attention
from kiln.config import BuildConfig
from kiln.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def captured(checkpoints):
    return capture_tiny(checkpoints("gemma2"), "Gemma2ForCausalLM")


def single_prompt_inputs(shape, n=11, block_size=4):
    """One fresh prompt over an empty cache: the one case the uncached attention sites compute too."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.randperm(8, generator=g)[: -(-n // block_size)].to(torch.int32)
    pos = torch.arange(n)
    return (
        torch.randint(3, 320, (n,), generator=g),
        pos,
        blocks[pos // block_size].long() * block_size + pos % block_size,
        blocks[None],
        torch.tensor([n], dtype=torch.int32),
        torch.tensor([0, n], dtype=torch.int32),
        torch.tensor([n - 1, n // 2]),
        torch.randn(shape.num_layers, 2, 8, block_size, shape.num_kv_heads, shape.head_dim, generator=g),
    )


def test_pass_order_is_printable():
    for build in (BuildConfig(), BuildConfig(fused_linears=False)):
        assert [line.split(":")[0] for line in describe(build)] == [p.__name__ for p in active_passes(build)]
        assert active_passes(build)[: len(PASSES)] == PASSES


def test_paged_attention_pass_preserves_outputs_and_fills_the_cache(captured):
    program, shape, context = captured
    inputs = single_prompt_inputs(shape)
    with torch.no_grad():
        before = program.module()(*inputs)
        result = paged_attention(program, context)
        rewritten = result.program
        cache = inputs[-1].clone()
        after = rewritten.module()(*inputs[:-1], cache)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert not nodes_calling(rewritten.graph, torch.ops.kiln.attention_site.default)
    assert len(nodes_calling(rewritten.graph, torch.ops.kiln.paged_attention.default)) == shape.num_layers
    assert result.sites == shape.num_layers
    # the pass copies the graph: the input program still has its sites
    assert len(nodes_calling(program.graph, torch.ops.kiln.attention_site.default)) == shape.num_layers
    written = cache[:, :, inputs[3][0].long()]
    assert not torch.equal(written, inputs[-1][:, :, inputs[3][0].long()])


def test_layer_facts_reach_the_graph(captured):
    program, shape, _ = captured
    sites = nodes_calling(program.graph, torch.ops.kiln.attention_site.default)
    windows = [n.args[5] for n in sorted(sites, key=lambda n: n.args[3])]
    softcaps = {n.args[6] for n in sites}
    assert windows == [8, -1, 8, -1]  # Gemma 2 alternates sliding and global layers
    assert softcaps == {5.0}
    assert {round(n.args[4], 6) for n in sites} == {round(24**-0.5, 6)}  # query_pre_attn_scalar


def test_checks_accept_the_real_pipeline(captured):
    program, _, context = captured
    checked = check_attention_captured(program, context)
    assert checked == PassResult(program, 0)  # a check never changes the program
    rewritten = check_attention_rewritten(paged_attention(program, context).program, context)
    assert rewritten.sites == 0
    with pytest.raises(RuntimeError, match="incomplete"):
        check_attention_rewritten(program, context)


def test_raw_sdpa_is_refused():
    class RawAttention(torch.nn.Module):
        def forward(
            self, input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices, kv_cache
        ):
            x = torch.nn.functional.one_hot(input_ids, 8).float()[None, None]
            return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)[0, 0]

    from kiln.compiler.capture import example_inputs
    from kiln.compiler.program_spec import CacheShape

    args = example_inputs(CacheShape(1, 1, 4), torch.float32, torch.device("cpu"), 4)
    program = torch.export.export(RawAttention(), args)
    with pytest.raises(UnsupportedModelError, match="outside transformers' attention interface"):
        check_attention_captured(program, PassContext(architecture="RawAttention", num_layers=1))
