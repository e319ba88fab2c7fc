"""How far the compiled program is from the captured one, beside how far bf16 itself is from float32.

The build's last check compares the compiled and the captured (op by op) program on one mixed
prefill/decode step. This script prints that difference for a checkpoint with and without the
fused-linear passes, where in the output it lies (per token row; per cache layer), and, for scale,
how far transformers' own bf16 logits are from its float32 logits on a prompt:

    python benchmarks/compile_agreement.py CHECKPOINT [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def _spread(got: torch.Tensor, want: torch.Tensor) -> dict[str, object]:
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    rows = diff.reshape(diff.shape[0], -1)
    return {
        "max": round(diff.max().item(), 4),
        "mean": round(diff.mean().item(), 5),
        "scale": round(want.abs().max().item(), 3),
        "rel_rms": round(((got - want).norm() / want.norm()).item(), 5),
        "row_max": [round(v, 4) for v in rows.max(dim=1).values.tolist()],
    }


def _cache_spread(a: torch.Tensor, b: torch.Tensor) -> dict[str, object]:
    diff = (a.float() - b.float()).abs()
    per_layer = diff.reshape(diff.shape[0], -1).max(dim=1).values
    return {
        "max": round(diff.max().item(), 4),
        "worst_layers": per_layer.topk(min(4, len(per_layer))).indices.tolist(),
        "layer_max": [round(v, 3) for v in per_layer.tolist()],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from kiln.compiler import inductor
    from kiln.compiler.capture import mixed_step_inputs, text_spec
    from kiln.compiler.export import export_program
    from kiln.compiler.model_facts import cache_shape, model_facts
    from kiln.compiler.passes import FUSED_LINEAR_PASSES, PASSES, PassContext
    from kiln.engine.programs import EagerProgram, load_compiled
    from kiln.models.loader import load_checkpoint

    device, dtype = torch.device(args.device), torch.bfloat16
    loaded = load_checkpoint(args.checkpoint, dtype, device)
    shape = cache_shape(loaded.config)
    facts = model_facts(loaded, shape)
    captured = export_program(
        text_spec(
            loaded.model,
            shape,
            dtype=dtype,
            device=device,
            block_size=16,
            max_num_tokens=8192,
            max_batch_size=64,
            architecture=facts.architecture,
        )
    )
    context = PassContext(architecture=facts.architecture, num_layers=shape.num_layers)
    programs = {}
    for name, passes in (("plain", PASSES), ("fused", PASSES + FUSED_LINEAR_PASSES)):
        program = captured
        for graph_pass in passes:
            program = graph_pass(program, context).program
        programs[name] = program
    del loaded.model
    torch.manual_seed(0)
    inputs = mixed_step_inputs(shape, dtype, device, 16)
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, program in programs.items():
            path = Path(tmp) / f"{name}.bin"
            inductor.compile_program(program, path)
            for how, run in (
                ("eager", EagerProgram(program)),
                ("compiled", load_compiled(program, path)),
            ):
                cache = inputs[-1].clone()
                with torch.inference_mode():
                    logits = run(*inputs[:-1], cache).float()
                outputs[f"{how}-{name}"] = (logits, cache)
    report = {}
    for a, b in (
        ("compiled-plain", "eager-plain"),
        ("compiled-fused", "eager-fused"),
        ("eager-fused", "eager-plain"),
        ("compiled-fused", "eager-plain"),
    ):
        report[f"{a} vs {b}"] = {
            "logits": _spread(outputs[a][0], outputs[b][0]),
            "cache": _cache_spread(outputs[a][1], outputs[b][1]),
        }
    del outputs, programs, captured
    torch.cuda.empty_cache()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).to(device).eval()
    ids = torch.randint(10, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        full = model(ids).logits[0].float()
        model.to(dtype)
        half = model(ids).logits[0].float()
    report["transformers bf16 vs float32 (16-token prompt)"] = {"logits": _spread(half, full)}
    for key, value in report.items():
        print(key)
        for part, numbers in value.items():
            print(f"  {part}: " + json.dumps(numbers))
    out = os.environ.get("OUT")
    if out:
        Path(out, "compile_agreement.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
