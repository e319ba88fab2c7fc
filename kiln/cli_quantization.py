"""TensorRT-LLM's weight-only build flags, accepted as aliases of `--quantization`.

`--use-weight-only [--weight-only-precision int8|int4|int4_awq|int4_gptq] [--per-group]` maps
through `PRECISIONS` onto BuildConfig.quantization; kiln's int4 is always grouped (--group-size),
so `--per-group` only confirms it.
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


def resolve_aliases(args: argparse.Namespace) -> dict[str, Any]:
    """{"quantization": ...} when the aliases were given (checked against --quantization), else {}."""
    precision = args.weight_only_precision
    if not args.use_weight_only:
        if precision is not None or args.per_group:
            raise KilnError("--weight-only-precision and --per-group need --use-weight-only")
        return {}
    method = PRECISIONS[precision or DEFAULT_PRECISION]
    if args.per_group and method == "int8_wo":
        raise KilnError("--per-group applies to int4 precisions; int8 is quantized per output channel")
    if args.quantization not in ("none", method):
        raise KilnError(f"--use-weight-only means --quantization {method}, which conflicts with {args.quantization}")
    return {"quantization": method}


__all__ = ["PRECISIONS", "add_aliases", "resolve_aliases"]
