"""TensorRT-LLM's quantization build flags, accepted as aliases of kiln's.

`--use-weight-only [--weight-only-precision int8|int4|int4_awq|int4_gptq] [--per-group]` maps
through `PRECISIONS` onto BuildConfig.quantization; kiln's int4 is always grouped (--group-size),
so `--per-group` only confirms it. `--enable-fp8` is `--quantization fp8`; `--use-smooth-quant
[--per-token] [--per-channel]` is `--quantization int8_sq` with activation scales per token (else
one calibrated per tensor) and weight scales per channel (else per tensor), as TensorRT-LLM reads them.
`--fp8-kv-cache` / `--int8-kv-cache` are `--kv-cache-dtype fp8` / `int8`.
"""

from __future__ import annotations

import argparse
from typing import Any

from kiln.errors import KilnError

PRECISIONS = {"int8": "int8_wo", "int4": "int4_wo", "int4_awq": "int4_awq", "int4_gptq": "int4_gptq"}
DEFAULT_PRECISION = "int8"  # TensorRT-LLM's default


def add_aliases(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TensorRT-LLM spellings of --quantization")
    group.add_argument("--use-weight-only", action="store_true", help="weight-only quantization (see --quantization)")
    group.add_argument(
        "--weight-only-precision",
        choices=tuple(PRECISIONS),
        default=None,
        help=f"with --use-weight-only: {', '.join(f'{k} = {v}' for k, v in PRECISIONS.items())} "
        f"(default: {DEFAULT_PRECISION})",
    )
    group.add_argument("--per-group", action="store_true", help="int4 per group of --group-size (kiln's only int4)")
    group.add_argument("--enable-fp8", action="store_true", help="--quantization fp8")
    group.add_argument("--use-smooth-quant", action="store_true", help="--quantization int8_sq")
    group.add_argument("--per-token", action="store_true", help="with --use-smooth-quant: --act-scales token")
    group.add_argument("--per-channel", action="store_true", help="with --use-smooth-quant: --weight-scales channel")
    group.add_argument("--fp8-kv-cache", action="store_true", help="--kv-cache-dtype fp8")
    group.add_argument("--int8-kv-cache", action="store_true", help="--kv-cache-dtype int8")


def resolve_aliases(args: argparse.Namespace) -> dict[str, Any]:
    """The BuildConfig fields the aliases given stand for (checked against kiln's own flags), else {}."""
    return {**_linears(args), **_kv_cache(args)}


def _kv_cache(args: argparse.Namespace) -> dict[str, Any]:
    chosen = [d for d, on in (("fp8", args.fp8_kv_cache), ("int8", args.int8_kv_cache)) if on]
    if len(chosen) > 1:
        raise KilnError("--fp8-kv-cache and --int8-kv-cache are different KV caches: give one")
    if not chosen:
        return {}
    if args.kv_cache_dtype not in ("auto", chosen[0]):
        raise KilnError(f"--{chosen[0]}-kv-cache conflicts with --kv-cache-dtype {args.kv_cache_dtype}")
    return {"kv_cache_dtype": chosen[0]}


def _linears(args: argparse.Namespace) -> dict[str, Any]:
    chosen = [flag for flag, on in (("--use-weight-only", args.use_weight_only), ("--enable-fp8", args.enable_fp8),
              ("--use-smooth-quant", args.use_smooth_quant)) if on]  # fmt: skip
    if len(chosen) > 1:
        raise KilnError(f"{' and '.join(chosen)} are different quantizations: give one")
    if (args.per_token or args.per_channel) and not args.use_smooth_quant:
        raise KilnError("--per-token and --per-channel need --use-smooth-quant")
    if args.enable_fp8:
        return {"quantization": _checked(args, "--enable-fp8", "fp8")}
    if args.use_smooth_quant:
        return {
            "quantization": _checked(args, "--use-smooth-quant", "int8_sq"),
            "act_scales": "token" if args.per_token else "tensor",
            "weight_scales": "channel" if args.per_channel else "tensor",
        }
    return _weight_only(args)


def _checked(args: argparse.Namespace, flag: str, method: str) -> str:
    if args.quantization not in ("none", method):
        raise KilnError(f"{flag} means --quantization {method}, which conflicts with {args.quantization}")
    return method


def _weight_only(args: argparse.Namespace) -> dict[str, Any]:
    precision = args.weight_only_precision
    if not args.use_weight_only:
        if precision is not None or args.per_group:
            raise KilnError("--weight-only-precision and --per-group need --use-weight-only")
        return {}
    method = PRECISIONS[precision or DEFAULT_PRECISION]
    if args.per_group and method == "int8_wo":
        raise KilnError("--per-group applies to int4 precisions; int8 is quantized per output channel")
    return {"quantization": _checked(args, "--use-weight-only", method)}


__all__ = ["PRECISIONS", "add_aliases", "resolve_aliases"]
