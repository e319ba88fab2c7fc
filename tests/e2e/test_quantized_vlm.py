"""LLaVA and BLIP-2 (OPT) built with int8_wo and int4_wo: the language model is quantized, the vision
program is not, the engine generates from images exactly what transformers does on the dequantized
language model, and `kiln eval` scores text as transformers does on it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))

from vlm_checkpoints import make_vlm_checkpoint, random_image  # noqa: E402
from vlm_reference import load_vlm_reference, vlm_greedy  # noqa: E402

from kiln import LLM, SamplingParams, build  # noqa: E402
from kiln.compiler.quantize.rtn import quantize  # noqa: E402
from kiln.engine.manifest import read_manifest  # noqa: E402

LIMITS = dict(max_batch_size=2, max_input_len=200, max_seq_len=256, max_num_tokens=256)
NEW_TOKENS = 8


FAMILIES = [
    ("llava", "LlavaForConditionalGeneration", "<image>\nThe kiln", "int8_wo", 8, 7),
    ("llava", "LlavaForConditionalGeneration", "<image>\nThe kiln", "int4_wo", 4, 7),
    ("blip2", "Blip2ForConditionalGeneration", "The kiln", "int4_wo", 4, 6),  # OPT: q, k, v, out, fc1, fc2
    ("blip2", "Blip2ForConditionalGeneration", "The kiln", "int8_wo", 8, 6),
]
EVAL_TEXT = "The kiln fires clay at night. Glaze melts slowly, and the potter waits for the kiln to cool. " * 3


@pytest.mark.parametrize(("family", "architecture", "prompt", "method", "bits", "linears"), FAMILIES)
def test_quantized_vlm_generates_with_images(tmp_path, family, architecture, prompt, method, bits, linears):
    checkpoint = make_vlm_checkpoint(family, tmp_path / "ckpt")
    options = dict(compile=False, progress=False, quantization=method, group_size=32, **LIMITS)
    engine = build(checkpoint, tmp_path / "engine", **options)
    block = read_manifest(engine).quantization
    assert block is not None and (block.method, block.bits) == (method, bits)
    assert len(block.layers) == linears * 2  # two decoder layers, nothing of the vision side
    assert not [name for name in block.layers if "vision" in name or "projector" in name or "qformer" in name]
    batch = [{"prompt": prompt, "images": [random_image(0, 40, 60)]}, "The kiln fires clay"]
    outs = LLM(engine).generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    model, processor = load_vlm_reference(checkpoint, architecture)
    tails = {name[name.index("layers.") :].removesuffix(".weight") for name in block.layers}
    with torch.no_grad():
        for name, module in model.named_modules():
            if "language_model" in name and any(name.endswith(tail) for tail in tails):
                module.weight.copy_(quantize(module.weight, bits, 32).dequantize(torch.float32))
                tails.discard(next(tail for tail in tails if name.endswith(tail)))
    assert not tails
    for prompt, out in zip(batch, outs):
        text, images = (prompt["prompt"], prompt["images"]) if isinstance(prompt, dict) else (prompt, [])
        assert out.token_ids == vlm_greedy(model, processor, text, images, NEW_TOKENS)[0], text
    _check_eval(engine, tmp_path, model)


def _check_eval(engine: Path, tmp_path: Path, model: torch.nn.Module) -> None:
    """`kiln eval` on text: the engine's perplexity is transformers' on the dequantized language model."""
    from kiln.eval_perplexity import EvalOptions, evaluate, split_windows

    text = tmp_path / "heldout.txt"
    text.write_text(EVAL_TEXT)
    result = evaluate(EvalOptions(engine=str(engine), text=str(text), window=40, progress=False))
    assert result.quantization is not None and result.windows >= 2
    language_model = model.language_model if hasattr(model, "qformer") else model  # BLIP-2: its OPT
    total = 0.0
    with torch.no_grad():
        for ids in split_windows(LLM(engine).encode(EVAL_TEXT), result.window):
            tokens = torch.tensor([ids])
            log_probs = torch.log_softmax(language_model(input_ids=tokens).logits[0, :-1].float(), dim=-1)
            total -= float(log_probs.gather(1, tokens[0, 1:, None]).sum())
    assert result.nll == pytest.approx(total / result.tokens, rel=1e-4)
