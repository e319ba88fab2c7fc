"""Held-out perplexity of a checkpoint's engines built dense and quantized.

Builds the checkpoint with `kiln build` once per method (dense, int8_wo, int4_wo g128 and g32 where
every linear's K allows it, int4_awq g128 with --calib-data; issue 18: fp8 W8A8 per token and
calibrated per tensor, int8_sq SmoothQuant, fp8 and int8 KV caches), scores each engine with
`kiln eval ENGINE --text HELDOUT --json` (the dense one also with --compare-hf), and prints a table:
perplexity, ratio to the dense engine, |delta| to it. Writes the rows as JSON.

    python benchmarks/quant_accuracy.py CHECKPOINT --heldout TEXT --calib TEXT [--json OUT]

--reference skips kiln: transformers scores the same windows on the float32 model whose decoder
linears hold the dequantized weights of each method (kiln's round to nearest, or its AWQ search), a
cross-check of the engine numbers; it also gives each method's mean KL divergence from the dense
model's next-token distribution, a closer measure of how far a method moves the model. For W8A8
methods the linears' inputs are fake-quantized as the engine's ops do; "w8a8 RTN" (int8 W8A8
without smoothing, SmoothQuant's baseline) exists only there. KV-cache methods have no reference.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Method:
    name: str  # table label
    quantization: str  # kiln build --quantization
    group_size: int = 128  # int4 only
    extra: tuple[str, ...] = ()  # more kiln build flags
    calib: bool = False  # --calib-data

    @property
    def build_args(self) -> list[str]:
        if self.quantization == "none":
            return list(self.extra)
        return ["--quantization", self.quantization, "--group-size", str(self.group_size), *self.extra]


DENSE = Method("dense", "none")
METHODS = (
    DENSE,
    Method("int8_wo", "int8_wo"),
    Method("int4_wo g128", "int4_wo", 128),
    Method("int4_wo g32", "int4_wo", 32),
    Method("int4_awq g128", "int4_awq", 128, calib=True),
    Method("fp8 W8A8 per token", "fp8"),
    Method("fp8 W8A8 static", "fp8", extra=("--act-scales", "tensor", "--weight-scales", "tensor"), calib=True),
    Method("int8_sq a0.5 per token", "int8_sq", extra=("--smoothquant-alpha", "0.5"), calib=True),
    Method("w8a8 RTN per token", "w8a8_rtn"),  # --reference only
    Method("fp8 KV", "none", extra=("--kv-cache-dtype", "fp8")),
    Method("fp8 KV calibrated", "none", extra=("--kv-cache-dtype", "fp8"), calib=True),
    Method("int8 KV", "none", extra=("--kv-cache-dtype", "int8"), calib=True),
)
KILN_ONLY = ("--kv-cache-dtype",)  # methods --reference cannot mirror


@dataclass(frozen=True)
class Row:
    method: str
    perplexity: float
    nll: float
    tokens: int
    ratio: float = 1.0  # perplexity / dense perplexity
    delta: float = 0.0  # |perplexity - dense perplexity|
    hf_perplexity: float | None = None  # transformers on the dense checkpoint (dense row)
    kl: float | None = None  # --reference: mean KL(dense || method) per scored token (nats)


def linear_widths(checkpoint: Path) -> tuple[int, ...]:
    """The input widths K of a Llama-style checkpoint's decoder linears."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return (cfg["hidden_size"], cfg["num_attention_heads"] * head_dim, cfg["intermediate_size"])


def default_window(checkpoint: Path) -> int:
    """The window a checkpoint's training script scored its held-out text in (scripts/train_large.py), or 128."""
    info = checkpoint / "training_info.json"
    return int(json.loads(info.read_text()).get("heldout_window", 128)) if info.exists() else 128


def applicable(methods: tuple[Method, ...], widths: tuple[int, ...]) -> tuple[Method, ...]:
    return tuple(
        m for m in methods if m.quantization in ("none", "int8_wo") or all(k % m.group_size == 0 for k in widths)
    )


def with_ratios(rows: list[Row]) -> list[Row]:
    dense = rows[0].perplexity
    return [Row(**{**asdict(r), "ratio": r.perplexity / dense, "delta": abs(r.perplexity - dense)}) for r in rows]


# ---- kiln: build and eval --------------------------------------------------------------------------


def _kiln(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "kiln", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kiln {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def kiln_row(method: Method, args: argparse.Namespace, work: Path) -> Row:
    engine = work / method.name.replace(" ", "_")
    build = ["build", str(args.checkpoint), "-o", str(engine), "--device", "cpu", "--dtype", "float32"]
    build += method.build_args + ([] if args.compile else ["--no-compile"])
    if method.calib:
        build += ["--calib-data", str(args.calib)]
    _kiln(*build)
    evaluate = ["eval", str(engine), "--text", str(args.heldout), "--json", "--window", str(args.window)]
    evaluate += ["--max-tokens", str(args.max_tokens)] if args.max_tokens else []
    if method == DENSE:
        evaluate += ["--compare-hf", str(args.checkpoint)]
    out = _kiln(*evaluate)
    result = json.loads(out[out.index("{") :])
    return Row(
        method.name, result["perplexity"], result["nll"], result["tokens"], hf_perplexity=result["hf_perplexity"]
    )


# ---- transformers reference ------------------------------------------------------------------------


def _decoder_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    from kiln.compiler.quantize.awq import decoder_layers

    return [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def quantize_reference(model: torch.nn.Module, method: Method, calib_ids: list[torch.Tensor]) -> None:
    """Replace the decoder linears' weights by the method's dequantized ones (in place)."""
    from kiln.compiler.quantize.awq import awq_quantize
    from kiln.compiler.quantize.rtn import quantize

    if method.quantization == "int4_awq":
        awq_quantize(model, calib_ids, method.group_size)  # leaves the dequantized weights in the model
        return
    if method.quantization in ("fp8", "int8_sq", "w8a8_rtn"):
        w8a8_reference(model, method, calib_ids)
        return
    rounders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "none": lambda w: w,
        "int8_wo": lambda w: quantize(w, 8, w.shape[1]).dequantize(torch.float32),
        "int4_wo": lambda w: quantize(w, 4, method.group_size).dequantize(torch.float32),
    }
    with torch.no_grad():
        for linear in _decoder_linears(model):
            linear.weight.copy_(rounders[method.quantization](linear.weight))


def w8a8_reference(model: torch.nn.Module, method: Method, calib_ids: list[torch.Tensor]) -> None:
    """The method's weights in place, and each quantized linear's input fake-quantized as the engine's op does."""
    from kiln.compiler.quantize.fp8 import fp8_linears
    from kiln.compiler.quantize.smoothquant import smoothquant
    from kiln.kernels.activation_quant import fake_quantize

    static = "tensor" in method.extra
    samples = calib_ids if static else None
    if method.quantization == "fp8":
        quantized = fp8_linears(model, not static, samples)
    else:
        alpha = float(method.extra[1]) if method.extra else 0.5
        quantized = smoothquant(model, calib_ids, alpha, True, True, smoothing=method.quantization == "int8_sq")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, weight in quantized.weights.items():
            module = modules[name.removesuffix(".weight")]
            module.weight.copy_(weight.dequantize(torch.float32))
            mode, dtype, scale = weight.activations, weight.values.dtype, weight.input_scale
            module.register_forward_pre_hook(
                lambda _m, a, mode=mode, dtype=dtype, scale=scale: (fake_quantize(a[0], mode, dtype, scale),)
            )


def reference_rows(methods: tuple[Method, ...], args: argparse.Namespace) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.compiler.quantize.methods import calibration_ids
    from kiln.eval_perplexity import split_windows

    tok: Any = AutoTokenizer.from_pretrained(args.checkpoint)
    ids = tok(args.heldout.read_text(encoding="utf-8"))["input_ids"][: args.max_tokens]
    windows = split_windows(ids, args.window)
    calib = calibration_ids(tok, str(args.calib), 64)  # what `kiln build --calib-data` cuts (64 x 512 tokens)
    dense: Any = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    rows = []
    for method in methods:
        model: Any = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        quantize_reference(model, method, calib)
        nll, kl, count = 0.0, 0.0, 0
        with torch.no_grad():
            for ids in windows:
                tokens = torch.tensor([ids])
                logp = torch.log_softmax(model(tokens).logits[0, :-1].float(), dim=-1)
                base = torch.log_softmax(dense(tokens).logits[0, :-1].float(), dim=-1)
                nll -= float(logp.gather(1, tokens[0, 1:, None]).sum())
                kl += float((base.exp() * (base - logp)).sum())
                count += len(ids) - 1
        rows.append(Row(method.name, math.exp(nll / count), nll / count, count, kl=kl / count))
        print(f"  {method.name}: {rows[-1].perplexity:.3f}, KL {kl / count:.3g}", file=sys.stderr, flush=True)
    return rows


# ---- table -----------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    kl = rows[0].kl is not None
    lines = ["| method | perplexity | ratio to dense | abs delta |" + (" KL to dense |" if kl else "")]
    lines += ["|---|---:|---:|---:|" + ("---:|" if kl else "")]
    for r in rows:
        lines += [
            f"| {r.method} | {r.perplexity:.3f} | {r.ratio:.4f} | {r.delta:.3f} |" + (f" {r.kl:.2e} |" if kl else "")
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--heldout", type=Path, required=True, help="text to score (never trained on)")
    ap.add_argument("--calib", type=Path, required=True, help="AWQ calibration text")
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens per scored window (default: the checkpoint's training_info.json heldout_window, else 128)",
    )
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    ap.add_argument("--compile", action="store_true", help="build with Inductor (default: --no-compile)")
    ap.add_argument("--reference", action="store_true", help="transformers on dequantized weights, no kiln")
    ap.add_argument("--work", type=Path, default=None, help="engine directory (default: a temporary one)")
    names = [m.name for m in METHODS]
    ap.add_argument("--methods", nargs="+", default=names, choices=names, metavar="NAME", help=f"of {names}")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args()
    if args.window is None:
        args.window = default_window(args.checkpoint)
    torch.manual_seed(0)

    chosen = tuple(m for m in METHODS if m == DENSE or m.name in args.methods)  # dense: the ratios' base
    methods = applicable(chosen, linear_widths(args.checkpoint))
    if args.reference:
        rows = reference_rows(tuple(m for m in methods if not set(KILN_ONLY) & set(m.extra)), args)
    else:
        methods = tuple(m for m in methods if m.quantization != "w8a8_rtn")
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            rows = [kiln_row(m, args, work) for m in methods]
    rows = with_ratios(rows)
    print(table(rows))
    if rows[0].hf_perplexity is not None:
        print(f"\ntransformers on the dense checkpoint: {rows[0].hf_perplexity:.3f}")
    if args.json is not None:
        payload = {"checkpoint": str(args.checkpoint), "reference": args.reference, "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
