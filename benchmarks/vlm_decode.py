"""Vision-language engines against text engines of the same LLM shape: decode ms/token and TTFT.

    python benchmarks/vlm_decode.py --workdir /tmp/kiln-vlm-decode --device cuda --out vlm_decode.json

Checked end to end on a CPU with tiny checkpoints (the test suite's LLaVA, Gemma 3, Qwen2.5-VL):

    python benchmarks/vlm_decode.py --workdir /tmp/kiln-vlm-decode-tiny --config tiny --device cpu

For each shape (random weights; bf16 on CUDA, fp32 on the CPU): a vision-language checkpoint, and
a text checkpoint built from its own text config (LLaVA-1.5-7B -> Llama-2-7B, gemma-3-4b ->
Gemma3ForCausalLM, Qwen2.5-VL-3B -> Qwen2ForCausalLM of the same widths; M-RoPE aside, the same
decode work). Each is written, `kiln build`-ed in this process and deleted (`--keep-checkpoints`
keeps it); existing engines are reused. Then, one engine at a time (prefix caching off):

- time to first token: `generate(max_tokens=1)` of one prompt, synchronized, preprocessing
  included: the VLM prompt with one image (a new random one each run), the text prompt of as many
  random token ids as the VLM's expanded prompt; median after one warm-up;
- decode ms/token: `generate(max_tokens=--tokens, ignore_eos)` of the same prompts, the engine's
  own per-token time after the first token (`LLM.last_profile`); median of `--runs` after one warm-up.

The ratio VLM / text is the number to watch (the fast path's target: within 5%). `--max-layers`
caps the text and vision depths (same widths) to keep builds short; `--no-compile` builds the
programs without Inductor (both engines alike). Prints a table; writes JSON to `--out` after
every shape.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "models"))

REAL_SHAPES = ("llava-1.5-7b", "gemma-3-4b", "qwen2.5-vl-3b")
TINY_SHAPES = {"tiny-llava": "llava", "tiny-gemma3": "gemma3", "tiny-qwen2.5-vl": "qwen2_5_vl"}
IMAGE_TOKEN = {
    "llava": "<image>",
    "gemma3": "<start_of_image>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
LIMITS = {
    "real": dict(max_batch_size=4, max_input_len=1024, max_seq_len=2048),
    "tiny": dict(max_batch_size=4, max_input_len=200, max_seq_len=512),
}


@dataclass
class Shape:
    """A vision-language model and its text twin, ready to be instantiated and saved."""

    family: str
    vlm_class: type
    vlm_config: Any
    processor: Any  # has save_pretrained
    tokenizer: Any
    text_class: type
    text_config: Any
    image_side: int


def _cap(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def _tiny_parts(family: str, scratch: Path) -> tuple[Any, Any, Any]:
    """(tiny model, processor, tokenizer) of the test suite's checkpoint factory."""
    from vlm_checkpoints import VLM_FAMILIES, VLM_VARIANTS

    model, processor = VLM_FAMILIES[family](VLM_VARIANTS[family]["base"])
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor.parts[0]
    return model, processor, tokenizer


def llava_7b(cap: int | None, scratch: Path) -> Shape:
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Model
    from vlm_speed import CLIP_VIT_L_336, IMAGE_SIDE, LLAMA_2_7B

    tiny, processor, tok = _tiny_parts("llava", scratch)
    from transformers import CLIPImageProcessor, LlavaProcessor

    side = {"shortest_edge": IMAGE_SIDE}
    images = CLIPImageProcessor(size=side, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    vision = {**CLIP_VIT_L_336, "num_hidden_layers": _cap(CLIP_VIT_L_336["num_hidden_layers"], cap)}
    text = LlamaConfig(**{**LLAMA_2_7B, "num_hidden_layers": _cap(LLAMA_2_7B["num_hidden_layers"], cap)})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text,
        image_token_index=tiny.config.image_token_index,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return Shape("llava", Model, config, processor, tok, LlamaForCausalLM, config.text_config, IMAGE_SIDE)


def gemma3_4b(cap: int | None, scratch: Path) -> Shape:
    from transformers import (
        Gemma3Config,
        Gemma3ForCausalLM,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers import Gemma3ForConditionalGeneration as Model

    tiny, _, tok = _tiny_parts("gemma3", scratch)
    text = Gemma3TextConfig(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=_cap(34, cap),
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
        query_pre_attn_scalar=256, max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=_cap(27, cap),
                                num_attention_heads=16, image_size=896, patch_size=14)  # fmt: skip
    c = tiny.config
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          image_token_index=c.image_token_index, boi_token_index=c.boi_token_index,
                          eoi_token_index=c.eoi_token_index)  # fmt: skip
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}), tokenizer=tok, image_seq_length=256
    )
    return Shape("gemma3", Model, config, processor, tok, Gemma3ForCausalLM, config.text_config, 896)


def qwen2_5_vl_3b(cap: int | None, scratch: Path) -> Shape:
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers import Qwen2_5_VLForConditionalGeneration as Model
    from vlm_checkpoints import _SavedTogether

    try:  # the PIL image processor (named ...Pil in newer transformers)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Images
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Images

    tiny, _, tok = _tiny_parts("qwen2_5_vl", scratch)
    depth = _cap(32, cap)
    dims = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=_cap(36, cap),
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1])  # fmt: skip
    c = tiny.config
    config = Qwen2_5_VLConfig(
        text_config={**dims, "rope_parameters": {**rope, "mrope_section": [16, 24, 24]}},
        vision_config=vision, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    text = Qwen2Config(**dims, rope_parameters=rope, tie_word_embeddings=True)
    return Shape("qwen2_5_vl", Model, config, _SavedTogether(tok, Images()), tok, Qwen2ForCausalLM, text, 336)


def tiny_shape(family: str, scratch: Path) -> Shape:
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    model, processor, tok = _tiny_parts(family, scratch)
    text_config = model.config.get_text_config()
    text_class: type = {"llava": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM}.get(family, Qwen2ForCausalLM)
    if family == "qwen2_5_vl":
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id")  # fmt: skip
        text_config = Qwen2Config(**{k: getattr(text_config, k) for k in keys})
    side = {"llava": 56, "gemma3": 28, "qwen2_5_vl": 64}[family]
    return Shape(family, type(model), model.config, processor, tok, text_class, text_config, side)


MAKERS: dict[str, Callable[[int | None, Path], Shape]] = {
    "llava-1.5-7b": llava_7b,
    "gemma-3-4b": gemma3_4b,
    "qwen2.5-vl-3b": qwen2_5_vl_3b,
}


# ---- checkpoints and engines ------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def save_random(model_class: type, config: Any, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """A random-weight model created directly in `dtype` on `device` (no fp32 copy of large weights)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # random init leaves norms at one: some noise, so no weight is special
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).eval().save_pretrained(path, safe_serialization=True)
    del model
    free_memory(device)


def ensure_engine(engine: Path, write: Callable[[Path], None], options: dict[str, Any], keep: bool) -> float | None:
    """Seconds spent writing the checkpoint and building, or None when the engine exists."""
    from kiln import build

    if (engine / "manifest.json").is_file():
        return None
    ckpt = engine.with_name(engine.name + "-ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(engine, ignore_errors=True)
    start = time.perf_counter()
    write(ckpt)
    build(ckpt, engine, progress=False, **options)
    if not keep:
        shutil.rmtree(ckpt)
    return time.perf_counter() - start


# ---- measuring --------------------------------------------------------------------------------------


def random_image(seed: int, side: int) -> Any:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def measure(engine: Path, request: Callable[[int], Any], tokens: int, runs: int, device: torch.device) -> dict:
    """TTFT (wall, synchronized) and decode ms/token of one request at a time on `engine`."""
    from kiln import LLM, SamplingParams

    llm = LLM(engine, enable_prefix_caching=False)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttft = []
    for i in range(runs + 1):
        start = time.perf_counter()
        out = llm.generate([request(i)], first)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ttft.append(time.perf_counter() - start)
    long = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    per_token = []
    for i in range(runs + 1):
        llm.generate([request(100 + i)], long)
        per_token.append(llm.last_profile["per_token_s"])
    engine_ = llm.engine
    result = {
        "ttft_ms": 1000 * statistics.median(ttft[1:]),
        "decode_ms_per_token": 1000 * statistics.median(per_token[1:]),
        "prompt_tokens": len(out[0].prompt_token_ids),
        "cuda_graphs": engine_.runner.graphs is not None,
        "pipelined_decode": bool(engine_.overlap_decode),
        "kv_blocks": engine_.stats().kv_blocks,
        "ttft_s": ttft,
        "per_token_s": per_token,
    }
    del llm, engine_
    free_memory(device)
    return result


def run_shape(name: str, shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    options = {**LIMITS["tiny" if name.startswith("tiny") else "real"], "compile": args.compile}
    options.update(device=device.type, dtype=str(dtype).removeprefix("torch."))
    work = args.workdir / name
    vlm_engine, text_engine = work / "vlm-engine", work / "text-engine"

    def write_vlm(ckpt: Path) -> None:
        save_random(shape.vlm_class, shape.vlm_config, ckpt, device, dtype)
        shape.processor.save_pretrained(ckpt)

    def write_text(ckpt: Path) -> None:
        save_random(shape.text_class, shape.text_config, ckpt, device, dtype)
        shape.tokenizer.save_pretrained(ckpt)

    build_vlm_s = ensure_engine(vlm_engine, write_vlm, options, args.keep_checkpoints)
    prompt = f"USER: {IMAGE_TOKEN[shape.family]}\nWhat is shown? ASSISTANT:"
    vlm = measure(
        vlm_engine, lambda i: {"prompt": prompt, "images": [random_image(i, shape.image_side)]}, args.tokens,
        args.runs, device,
    )  # fmt: skip
    print(json.dumps({"shape": name, "vlm": {k: v for k, v in vlm.items() if not k.endswith("_s")}}), flush=True)
    build_text_s = ensure_engine(text_engine, write_text, options, args.keep_checkpoints)
    vocab = min(len(shape.tokenizer), shape.text_config.vocab_size)
    rng = np.random.default_rng(0)

    def text_request(i: int) -> list[int]:
        return [int(t) for t in rng.integers(3, vocab, vlm["prompt_tokens"])]

    text = measure(text_engine, text_request, args.tokens, args.runs, device)
    print(json.dumps({"shape": name, "text": {k: v for k, v in text.items() if not k.endswith("_s")}}), flush=True)
    return {
        "vlm": vlm,
        "text": text,
        "decode_ratio": vlm["decode_ms_per_token"] / text["decode_ms_per_token"],
        "build_vlm_s": build_vlm_s,
        "build_text_s": build_text_s,
        "image_side": shape.image_side,
    }


def print_table(results: dict[str, dict], device_name: str, tokens: int) -> None:
    print(f"\n{device_name}, one request, {tokens} new tokens, decode = ms/token after the first")
    head = f"{'shape':16s} {'VLM decode':>11s} {'text decode':>12s} {'ratio':>7s} {'VLM TTFT':>9s} {'text TTFT':>10s}"
    print(head + f" {'prompt':>7s} {'graphs':>7s}")
    for name, r in results.items():
        v, t = r["vlm"], r["text"]
        print(
            f"{name:16s} {v['decode_ms_per_token']:11.2f} {t['decode_ms_per_token']:12.2f} {r['decode_ratio']:7.3f} "
            f"{v['ttft_ms']:9.1f} {t['ttft_ms']:10.1f} {v['prompt_tokens']:7d} {str(v['cuda_graphs']):>7s}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--config", default="real", choices=["real", "tiny"])
    ap.add_argument("--shapes", nargs="*", help=f"subset of {list(REAL_SHAPES)} (real) or {list(TINY_SHAPES)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per decode run (default 256; tiny 32)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up")
    ap.add_argument("--max-layers", type=int, default=None, help="cap text and vision depths (real shapes)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="build without Inductor")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("vlm_decode.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --config tiny --device cpu for a CPU check)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.config == "tiny"
    args.tokens = args.tokens or (32 if tiny else 256)
    names = args.shapes or list(TINY_SHAPES if tiny else REAL_SHAPES)
    import transformers

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": device_name, "dtype": str(dtype), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokens": args.tokens, "runs": args.runs,
        "max_layers": args.max_layers, "compiled": args.compile, "shapes": {},
    }  # fmt: skip
    for name in names:
        scratch = args.workdir / name / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        shape = tiny_shape(TINY_SHAPES[name], scratch) if tiny else MAKERS[name](args.max_layers, scratch)
        report["shapes"][name] = run_shape(name, shape, args, device, dtype)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report["shapes"], device_name, args.tokens)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
