"""`kiln build`'s and the runtime commands' options come from the config dataclasses."""

import dataclasses

import pytest

from kiln.cli import parser
from kiln.cli_options import flag_name, values
from kiln.config import BuildConfig, RuntimeConfig

RUNTIME_COMMANDS = (["run", "e"], ["serve", "e"], ["bench", "e"])


def option_strings(argv: list[str]) -> set[str]:
    sub = parser()._subparsers._group_actions[0].choices[argv[0]]  # type: ignore[union-attr]
    return {s for action in sub._actions for s in action.option_strings}


def test_every_build_field_has_a_flag_and_the_dataclass_defaults():
    flags = option_strings(["build"])
    for field in dataclasses.fields(BuildConfig):
        assert "--" + flag_name(field) in flags, field.name
    args = parser().parse_args(["build", "ckpt", "-o", "out"])
    assert BuildConfig(**values(args, BuildConfig)) == BuildConfig()


@pytest.mark.parametrize("argv", RUNTIME_COMMANDS, ids=lambda a: a[0])
def test_every_runtime_field_has_a_flag_and_the_dataclass_defaults(argv):
    flags = option_strings(argv)
    for field in dataclasses.fields(RuntimeConfig):
        assert "--" + flag_name(field) in flags, field.name
    assert RuntimeConfig(**values(parser().parse_args(argv), RuntimeConfig)) == RuntimeConfig()


def test_existing_build_flags_keep_working():
    args = parser().parse_args(
        "build ckpt -o out --dtype bfloat16 --device cpu --max-batch-size 4 --max-input-len 100 --max-seq-len 300 "
        "--max-num-tokens 512 --tokens-per-block 32 --no-compile --trust-remote-code --max-multimodal-len 64".split()
    )
    assert BuildConfig(**values(args, BuildConfig)) == BuildConfig(
        dtype="bfloat16",
        device="cpu",
        max_batch_size=4,
        max_input_len=100,
        max_seq_len=300,
        max_num_tokens=512,
        tokens_per_block=32,
        compile=False,
        trust_remote_code=True,
        max_multimodal_len=64,
    )


def test_build_choices_turn_off_with_no_flags():
    flags = "--no-fused-linears --no-fuse-rope --no-combo-kernels --no-pdl"
    args = parser().parse_args(["build", "ckpt", "-o", "out", *flags.split()])
    config = BuildConfig(**values(args, BuildConfig))
    assert not (config.fused_linears or config.fuse_rope or config.combo_kernels or config.pdl)


@pytest.mark.parametrize("argv", RUNTIME_COMMANDS, ids=lambda a: a[0])
def test_existing_runtime_flags_keep_working(argv):
    extra = "--eager --no-prefix-caching --no-cuda-graphs --num-kv-blocks 7 --kv-cache-memory-fraction 0.5"
    runtime = RuntimeConfig(**values(parser().parse_args([*argv, *extra.split()]), RuntimeConfig))
    assert runtime == RuntimeConfig(
        use_compiled=False,
        enable_prefix_caching=False,
        cuda_graphs=False,
        num_kv_blocks=7,
        kv_cache_memory_fraction=0.5,
    )


def test_kernel_choices_and_overlap_decode_are_options():
    argv = "run e --attention-kernel reference --linear-kernel reference --argmax-kernel reference --overlap-decode"
    runtime = RuntimeConfig(**values(parser().parse_args(argv.split()), RuntimeConfig))
    assert (runtime.attention_kernel, runtime.linear_kernel, runtime.argmax_kernel) == ("reference",) * 3
    assert runtime.overlap_decode is True
    off = parser().parse_args("run e --no-overlap-decode".split())
    assert values(off, RuntimeConfig)["overlap_decode"] is False
    with pytest.raises(SystemExit):
        parser().parse_args("run e --attention-kernel triton".split())
