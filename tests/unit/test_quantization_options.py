"""The build's quantization fields, their flags, and TensorRT-LLM's spellings of them."""

import pytest

from kiln.cli import parser
from kiln.cli_options import values
from kiln.cli_quantization import PRECISIONS, resolve_aliases
from kiln.config import QUANTIZATIONS, BuildConfig
from kiln.errors import KilnError


def _build_options(*argv: str) -> dict:
    args = parser().parse_args(["build", "ckpt", "-o", "out", *argv])
    return {**values(args, BuildConfig), **resolve_aliases(args)}


def test_defaults_quantize_nothing():
    config = BuildConfig()
    assert (config.quantization, config.group_size, config.quantize_lm_head) == ("none", 128, False)
    assert (config.calib_data, config.calib_size) == (None, 64)


def test_invalid_values_are_refused():
    with pytest.raises(KilnError, match="quantization must be one of"):
        BuildConfig(quantization="int3_wo")
    for bad in (16, 100, 0):
        with pytest.raises(KilnError, match="group_size must be one of"):
            BuildConfig(group_size=bad)
    with pytest.raises(KilnError, match="calib_size"):
        BuildConfig(calib_size=0)
    with pytest.raises(KilnError, match="quantize_lm_head must be true or false"):
        BuildConfig(quantize_lm_head="yes")  # type: ignore[arg-type]


def test_kiln_flags_reach_the_config():
    options = _build_options("--quantization", "int4_wo", "--group-size", "32", "--quantize-lm-head")
    config = BuildConfig(**options)
    assert (config.quantization, config.group_size, config.quantize_lm_head) == ("int4_wo", 32, True)
    options = _build_options("--quantization", "int4_awq", "--calib-data", "notes.txt", "--calib-size", "8")
    assert (options["calib_data"], options["calib_size"]) == ("notes.txt", 8)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_tensorrt_llm_spellings_map_onto_quantization(precision):
    options = _build_options("--use-weight-only", "--weight-only-precision", precision)
    assert options["quantization"] == PRECISIONS[precision] and PRECISIONS[precision] in QUANTIZATIONS
    assert _build_options("--use-weight-only")["quantization"] == "int8_wo"
    assert _build_options("--use-weight-only", "--weight-only-precision", "int4", "--per-group")["quantization"] == (
        "int4_wo"
    )


def test_tensorrt_llm_spellings_that_conflict_are_refused():
    with pytest.raises(KilnError, match="conflicts"):
        _build_options("--use-weight-only", "--quantization", "int4_wo")
    with pytest.raises(KilnError, match="need --use-weight-only"):
        _build_options("--weight-only-precision", "int4")
    with pytest.raises(KilnError, match="int8 is quantized per output channel"):
        _build_options("--use-weight-only", "--per-group")


def test_w8a8_flags_and_their_tensorrt_llm_spellings():
    options = _build_options("--quantization", "fp8", "--act-scales", "tensor", "--weight-scales", "tensor")
    config = BuildConfig(**options)
    assert (config.quantization, config.act_scales, config.weight_scales) == ("fp8", "tensor", "tensor")
    assert _build_options("--enable-fp8")["quantization"] == "fp8"
    sq = _build_options("--use-smooth-quant", "--smoothquant-alpha", "0.8", "--per-token", "--per-channel")
    assert (sq["quantization"], sq["smoothquant_alpha"], sq["act_scales"], sq["weight_scales"]) == (
        "int8_sq",
        0.8,
        "token",
        "channel",
    )
    plain = _build_options("--use-smooth-quant")
    assert (plain["act_scales"], plain["weight_scales"]) == ("tensor", "tensor")
    for argv, message in (
        (("--enable-fp8", "--quantization", "int8_wo"), "conflicts"),
        (("--enable-fp8", "--use-smooth-quant"), "different quantizations"),
        (("--per-token",), "need --use-smooth-quant"),
    ):
        with pytest.raises(KilnError, match=message):
            _build_options(*argv)
    with pytest.raises(KilnError, match="smoothquant_alpha"):
        BuildConfig(smoothquant_alpha=1.5)


def test_kv_cache_flags_and_their_tensorrt_llm_spellings():
    assert BuildConfig().kv_cache_dtype == "auto"
    assert _build_options("--kv-cache-dtype", "int8")["kv_cache_dtype"] == "int8"
    assert _build_options("--fp8-kv-cache", "--enable-fp8")["kv_cache_dtype"] == "fp8"
    assert _build_options("--int8-kv-cache")["kv_cache_dtype"] == "int8"
    with pytest.raises(KilnError, match="different KV caches"):
        _build_options("--fp8-kv-cache", "--int8-kv-cache")
    with pytest.raises(KilnError, match="conflicts with --kv-cache-dtype"):
        _build_options("--fp8-kv-cache", "--kv-cache-dtype", "int8")
    with pytest.raises(KilnError, match="kv_cache_dtype must be one of"):
        BuildConfig(kv_cache_dtype="fp4")
