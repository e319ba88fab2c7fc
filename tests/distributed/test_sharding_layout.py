"""How a tensor-parallel build splits heads, vocabulary, int8 scales and quantized weights, and the splits it
refuses (no build)."""

from __future__ import annotations

import pytest
import torch

from kiln.compiler.quantize.rtn import quantize_int8
from kiln.compiler.sharding.layout import HeadSplit, check_tp, head_split, vocab_rows
from kiln.compiler.sharding.quantize import row_parallel_int8
from kiln.compiler.sharding.shard import Slice
from kiln.compiler.sharding.split_quantized import AMAX_COLUMNS, split_weight
from kiln.errors import KilnError
from kiln.kernels.quantized_weight import QuantizedWeight


def test_heads_split_or_replicate() -> None:
    assert head_split(1, 2, num_heads=8, num_kv_heads=4) == HeadSplit(4, 4, 2, 2)
    # one KV head per two ranks: each rank reads the KV head of its query heads
    assert [head_split(r, 4, 8, 2) for r in range(4)] == [
        HeadSplit(0, 2, 0, 1),
        HeadSplit(2, 2, 0, 1),
        HeadSplit(4, 2, 1, 1),
        HeadSplit(6, 2, 1, 1),
    ]


def test_vocab_rows_pad_the_last_rank() -> None:
    assert [vocab_rows(r, 3, 10) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]


@pytest.mark.parametrize(
    "tp, heads, kv, mlp, message",
    [
        (3, 4, 2, 129, "4 attention heads do not divide over 3 ranks"),
        (4, 8, 6, 128, "6 KV heads do not divide over 4 ranks"),
        (4, 12, 3, 128, "4 ranks do not divide over 3 KV heads"),
        (2, 4, 2, 127, "the MLP width 127 does not divide over 2 ranks"),
    ],
)
def test_splits_that_do_not_divide_are_refused(tp: int, heads: int, kv: int, mlp: int, message: str) -> None:
    with pytest.raises(KilnError, match=message):
        check_tp(tp, heads, kv, mlp, "ckpt")


def test_row_parallel_int8_uses_whole_row_scales() -> None:
    weight = torch.randn(6, 8)
    weight[0, 6] = 9.0  # the largest |w| of row 0 lies in rank 1's columns
    whole = quantize_int8(weight)
    for rank in range(2):
        piece = Slice("w", 1, rank * 4, rank * 4 + 4, 4)
        shard = weight[:, piece.start : piece.stop]
        read = lambda s: weight[:, s.start : s.stop]  # noqa: E731
        got = row_parallel_int8({"w": shard}, {"w": piece}, 2, read).weights["w"]
        assert torch.equal(got.scales, whole.scales)
        assert torch.equal(got.values, whole.values[:, piece.start : piece.stop])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"quantization": "int4_awq", "calib_data": "notes.txt"}, "int4 groups of 128 do not divide the MLP slice"),
    ],
)
def test_what_a_sharded_build_does_not_do_is_refused(tmp_path, options, message) -> None:
    from kiln.compiler.sharding.build import check_sharded_request
    from kiln.config import BuildConfig
    from tests.tiny_checkpoints import make_checkpoint

    make_checkpoint("llama", tmp_path)
    with pytest.raises(KilnError, match=message):
        check_sharded_request(tmp_path, BuildConfig(tp_size=2, **options))


def _weight(groups: int, activations: str = "none", perm: bool = False) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (6, 8), generator=gen, dtype=torch.int8)
    scales = torch.rand(6, groups, generator=gen) + 0.5
    zeros = None if activations != "none" else torch.randint(0, 16, (6, groups), generator=gen).float()
    return QuantizedWeight(
        values,
        scales,
        zeros,
        8 if activations != "none" else 4,
        8 // groups,
        perm=torch.randperm(8, generator=gen) if perm else None,
        activations=activations,
    )


def test_quantized_rows_split_with_their_scales() -> None:
    whole = _weight(groups=2, perm=True)
    part = split_weight("q", whole, Slice("q", 0, 2, 4, 2))
    assert torch.equal(part.values, whole.values[2:4]) and torch.equal(part.scales, whole.scales[2:4])
    assert part.zeros is not None and whole.zeros is not None and torch.equal(part.zeros, whole.zeros[2:4])
    assert part.perm is whole.perm and part.group_size == 4  # act-order orders the whole input: kept


def test_quantized_columns_split_whole_groups_and_per_token_inputs_get_absmax_columns() -> None:
    whole = _weight(groups=2)
    part = split_weight("o", whole, Slice("o", 1, 4, 8, 4))
    assert torch.equal(part.values, whole.values[:, 4:]) and torch.equal(part.scales, whole.scales[:, 1:])
    assert torch.equal(part.dequantize(torch.float32), whole.dequantize(torch.float32)[:, 4:])
    dynamic = split_weight("o", _weight(groups=1, activations="dynamic"), Slice("o", 1, 4, 8, 4))
    assert dynamic.values.shape == (6, 4 + AMAX_COLUMNS) and not dynamic.values[:, 4:].any()
    assert dynamic.group_size == 4 + AMAX_COLUMNS  # one per-channel scale: the whole row's


def test_quantized_column_splits_that_cannot_be_made_are_refused() -> None:
    with pytest.raises(KilnError, match="groups of 4 columns would straddle two ranks"):
        split_weight("o", _weight(groups=2), Slice("o", 1, 2, 4, 2))
    with pytest.raises(KilnError, match="act-order"):
        split_weight("o", _weight(groups=2, perm=True), Slice("o", 1, 4, 8, 4))


def test_a_build_under_torchrun_needs_one_process_per_rank(monkeypatch) -> None:
    from kiln.compiler.sharding.launched import BuildLaunch
    from kiln.config import BuildConfig

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(KilnError, match="for 2 ranks .* torchrun launched 3 processes"):
        BuildLaunch.from_env(BuildConfig(tp_size=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    launch = BuildLaunch.from_env(BuildConfig(tp_size=2))
    assert launch is not None and (launch.rank, launch.world_size, launch.leads) == (1, 2, False)


def test_a_stage_keeps_its_layers_quantized_linears_numbered_as_its_layers() -> None:
    from kiln.compiler.sharding.stage_cut import stage_linears
    from kiln.models.quantized_checkpoint import QuantizedLinears

    w = {n: _weight(1) for n in range(4)}
    quantized = QuantizedLinears(
        "int8_wo",
        8,
        0,
        {
            "model.language_model.layers.0.mlp.down_proj.weight": w[0],
            "model.language_model.layers.2.mlp.down_proj.weight": w[1],
            "model.language_model.layers.3.self_attn.o_proj.weight": w[2],
            "lm_head.weight": w[3],
        },
    )
    staged = stage_linears(quantized, 2, 4, "model.language_model")
    assert staged is not None
    renamed = {
        "model.language_model.layers.0.mlp.down_proj.weight": w[1],
        "model.language_model.layers.1.self_attn.o_proj.weight": w[2],
        "lm_head.weight": w[3],  # not a layer's: kept (a stage without the head has no such parameter)
    }
    assert staged.weights.keys() == renamed.keys()
    assert all(staged.weights[k] is v for k, v in renamed.items())
    assert (staged.method, staged.bits) == ("int8_wo", 8)


def test_the_manifest_names_every_stages_quantized_layers_by_the_checkpoints_numbers() -> None:
    from kiln.compiler.pipeline import WrittenProgram
    from kiln.compiler.sharding.stage_cut import checkpoint_layer_name
    from kiln.compiler.sharding.stages import stages_written

    assert checkpoint_layer_name("model.layers.1.mlp.down_proj.weight", 4) == "model.layers.5.mlp.down_proj.weight"
    assert checkpoint_layer_name("model.language_model.layers.0.self_attn.o_proj.weight", 2) == (
        "model.language_model.layers.2.self_attn.o_proj.weight"
    )
    assert checkpoint_layer_name("model.layers.3.x.layers.1.w", 2) == "model.layers.5.x.layers.1.w"  # the first only
    assert checkpoint_layer_name("lm_head.weight", 6) == "lm_head.weight"
    assert checkpoint_layer_name("model.sublayers.1.w", 6) == "model.sublayers.1.w"

    def stage(*names: str) -> WrittenProgram:
        return WrittenProgram(compiled=False, op_modules={}, quantized_layers=names)

    # TP2 x PP2, two layers a stage: ranks 0 and 1 hold layers 0-1, ranks 2 and 3 layers 2-3 (and the head)
    first = stage("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")
    last = stage("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight")
    merged = stages_written([first, first, last, last], tp_size=2, layers_per_stage=2)
    assert merged.quantized_layers == (
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
        "lm_head.weight",
    )
