"""LLaVA-1.5-7B shape (random weights): kiln's vision program and time to first token against transformers.

    python benchmarks/vlm_speed.py --workdir /tmp/kiln-vlm --config llava-1.5-7b --device cuda --out vlm_speed.json

Checked end to end on a CPU with a tiny LLaVA:

    python benchmarks/vlm_speed.py --workdir /tmp/kiln-vlm-tiny --config tiny --device cpu

Steps: write a random-weight `LlavaForConditionalGeneration` checkpoint with the real architecture
(CLIP ViT-L/14 at 336 px, layer -2, CLS dropped, GELU MLP projector, Llama-2-7B) and its
`LlavaProcessor` (skipped when it exists); `kiln build` it (timed; skipped when the engine exists);
then, in this process, kiln first and transformers (eager, after kiln's memory is freed) second:

- vision encoder + projector, one 336x336 image: kiln's vision program through the pipeline's
  encode path vs transformers' `get_image_features`; median of 20 synchronized runs after warm-up;
- time to first token of "USER: <image>\\nWhat is shown? ASSISTANT:" with one image, preprocessing
  included: `LLM.generate(..., max_tokens=1)` (prefix caching off, a new image each run) vs
  processor + `model.generate(max_new_tokens=1)`; median of 10 after warm-up;
- kiln's decode ms/token over 64 new tokens (information only).

Prints a table and writes everything (raw times included) as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "USER: <image>\nWhat is shown? ASSISTANT:"
IMAGE_SIDE = 336
VISION_RUNS, TTFT_RUNS, WARMUP = 20, 10, 3
DECODE_TOKENS = 64

# Build limits: the real model as the brief fixes them; the tiny model within its 512 positions.
BUILD_LIMITS = {
    "llava-1.5-7b": ["--max-batch-size", "4", "--max-input-len", "1024", "--max-seq-len", "2048"],
    "tiny": ["--max-batch-size", "4", "--max-input-len", "200", "--max-seq-len", "256"],
}

CLIP_VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    projection_dim=768,
)
LLAMA_2_7B = dict(
    vocab_size=32064,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


# ---- checkpoint and engine ------------------------------------------------------------------------


def make_llava_7b(path: Path, device: torch.device) -> None:
    """Random-weight LLaVA-1.5-7B architecture, bf16, initialized directly on `device`."""
    from tiny_checkpoints import make_tokenizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as Model

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if len(tok) > LLAMA_2_7B["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the config's vocab ({LLAMA_2_7B['vocab_size']})")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_VIT_L_336),
        text_config=LlamaConfig(**LLAMA_2_7B),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=CLIP_VIT_L_336["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no fp32 copy of 7B weights
    try:
        with torch.device(device):
            model = Model(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    del model
    free_memory(device)


def make_checkpoint(name: str, path: Path, device: torch.device) -> float | None:
    """Seconds spent writing the checkpoint, or None when it exists (written to a staging dir, then renamed)."""
    if path.is_dir():
        return None
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    if name == "tiny":
        from vlm_checkpoints import make_vlm_checkpoint

        make_vlm_checkpoint("llava", staging)
    else:
        make_llava_7b(staging, device)
    staging.rename(path)
    return time.perf_counter() - start


def build_engine(config: str, ckpt: Path, engine: Path, device: str, dtype: str) -> float | None:
    """Seconds `kiln build` took, or None when the engine exists (kiln writes manifest.json last)."""
    if (engine / "manifest.json").is_file():
        return None
    command = [sys.executable, "-m", "kiln", "build", str(ckpt), "-o", str(engine)]
    command += ["--dtype", dtype, "--device", device, *BUILD_LIMITS[config]]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


# ---- measuring ------------------------------------------------------------------------------------


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[int], Any], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of `runs` synchronized calls fn(i), after `warmup` calls; i counts every call."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(warmup, warmup + runs):
        start = time.perf_counter()
        fn(i)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def random_image(seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def as_features(out: Any) -> torch.Tensor:
    """[tokens, hidden] of transformers' get_image_features: a tensor, a list per image, or a ModelOutput."""
    if not isinstance(out, torch.Tensor) and getattr(out, "pooler_output", None) is not None:
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])
    return out.reshape(-1, out.shape[-1])


def measure_kiln(engine: Path, device: torch.device) -> tuple[dict[str, Any], torch.Tensor]:
    from kiln import LLM, SamplingParams

    llm = LLM(engine, enable_prefix_caching=False)
    pipe = llm.engine.multimodal
    assert pipe is not None, f"{engine} is not a vision-language engine"

    # Vision program + projector only: the pipeline's encode path on one preprocessed image.
    processed = pipe.family.process(pipe.processor, PROMPT, [random_image(0)], pipe.facts.family_config)
    items = [item.to(pipe.device, pipe.dtype) for item in pipe.family.split_images(processed, pipe.facts.family_config)]

    facts = pipe.facts

    def encode(_: int) -> list[torch.Tensor]:
        with torch.inference_mode():
            return pipe.family.encode(pipe.program, items, facts.vision_batch_limit, pipe.state, facts.family_config)

    vision = timed(encode, VISION_RUNS, WARMUP, device)
    features = encode(0)[0].float().cpu()

    # Time to first token, preprocessing included; a new image every call (and no prefix cache).
    first = SamplingParams(max_tokens=1, temperature=0.0)
    profiles: list[dict[str, float]] = []

    def ttft_call(i: int) -> None:
        llm.generate([{"prompt": PROMPT, "images": [random_image(1000 + i)]}], first)
        profiles.append(dict(llm.last_profile))

    ttft = timed(ttft_call, TTFT_RUNS, WARMUP, device)
    profiles = profiles[WARMUP:]

    decode = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True)
    per_token = []
    for i in range(3):
        out = llm.generate([{"prompt": PROMPT, "images": [random_image(2000 + i)]}], decode)
        per_token.append(llm.last_profile["per_token_s"])
    prompt_tokens = len(out[0].prompt_token_ids)
    result = {
        "vision_ms": ms(vision),
        "ttft_ms": ms(ttft),
        "ttft_breakdown_ms": {
            key: ms([p[key] for p in profiles]) for key in ("preprocess_s", "vision_s", "time_to_first_token_s")
        },
        "decode_ms_per_token": ms(per_token[1:]),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": len(out[0].token_ids),
        "image_feature_shape": list(features.shape),
        "vision_s": vision,
        "ttft_s": ttft,
    }
    return result, features  # the engine goes with this frame: the caller then frees its memory


def measure_transformers(ckpt: Path, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Any], torch.Tensor]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    cfg = model.config

    def inputs_for(image: Any) -> Any:
        inputs = processor(text=[PROMPT], images=[image], return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return inputs

    pixels = inputs_for(random_image(0))["pixel_values"]

    def encode(_: int) -> Any:
        with torch.inference_mode():
            return model.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )

    vision = timed(encode, VISION_RUNS, WARMUP, device)
    features = as_features(encode(0)).float().cpu()

    def ttft_call(i: int) -> None:
        with torch.inference_mode():
            model.generate(**inputs_for(random_image(1000 + i)), max_new_tokens=1, do_sample=False)

    ttft = timed(ttft_call, TTFT_RUNS, WARMUP, device)
    result = {
        "vision_ms": ms(vision),
        "ttft_ms": ms(ttft),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "image_processor": type(processor.image_processor).__name__,
        "image_feature_shape": list(features.shape),
        "vision_s": vision,
        "ttft_s": ttft,
    }
    return result, features


# ---- main -----------------------------------------------------------------------------------------


def print_table(kiln: dict[str, Any], hf: dict[str, Any]) -> None:
    print(f"\n{'system':14s} {'vision ms':>10s} {'TTFT ms':>10s} {'vision ratio':>13s} {'TTFT ratio':>11s}")
    for name, row in (("kiln", kiln), ("transformers", hf)):
        print(
            f"{name:14s} {row['vision_ms']:10.2f} {row['ttft_ms']:10.2f} "
            f"{row['vision_ms'] / kiln['vision_ms']:12.2f}x {row['ttft_ms'] / kiln['ttft_ms']:10.2f}x"
        )
    print("(ratio = the system's time / kiln's time; above 1 means kiln is faster)")
    parts = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in kiln["ttft_breakdown_ms"].items())
    print(f"kiln TTFT breakdown ms: {parts}")
    print(f"kiln decode: {kiln['decode_ms_per_token']:.2f} ms/token ({DECODE_TOKENS} new tokens, batch 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--config", default="llava-1.5-7b", choices=sorted(BUILD_LIMITS))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, default=Path("vlm_speed.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --config tiny --device cpu for a CPU check)")
    device = torch.device(args.device)
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    ckpt = args.workdir / f"{args.config}-ckpt"
    engine = args.workdir / f"{args.config}-engine-{args.device}-{dtype_name}"

    checkpoint_s = make_checkpoint(args.config, ckpt, device)
    print(json.dumps({"checkpoint": str(ckpt), "checkpoint_s": checkpoint_s}), flush=True)
    build_s = build_engine(args.config, ckpt, engine, args.device, dtype_name)
    print(json.dumps({"engine": str(engine), "build_s": build_s}), flush=True)

    torch.manual_seed(0)
    kiln, kiln_features = measure_kiln(engine, device)
    free_memory(device)
    print(json.dumps({"system": "kiln", "vision_ms": kiln["vision_ms"], "ttft_ms": kiln["ttft_ms"]}), flush=True)
    if device.type == "cuda":
        print(f"after freeing kiln: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated", flush=True)
    hf, hf_features = measure_transformers(ckpt, device, dtype)
    free_memory(device)
    print(json.dumps({"system": "transformers", "vision_ms": hf["vision_ms"], "ttft_ms": hf["ttft_ms"]}), flush=True)

    import transformers

    same_shape = kiln_features.shape == hf_features.shape
    manifest = json.loads((engine / "manifest.json").read_text())
    report = {
        "config": args.config,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt": PROMPT,
        "image": f"{IMAGE_SIDE}x{IMAGE_SIDE} random RGB",
        "checkpoint_s": checkpoint_s,
        "build_s": build_s,
        "build_timings_s": manifest.get("timings_s"),
        "vision_features_max_abs_diff": float((kiln_features - hf_features).abs().max()) if same_shape else None,
        "kiln": kiln,
        "transformers_eager": hf,
        "vision_speedup": hf["vision_ms"] / kiln["vision_ms"],
        "ttft_speedup": hf["ttft_ms"] / kiln["ttft_ms"],
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(kiln, hf)
    print(
        f"vision features: kiln {kiln['image_feature_shape']}, transformers {hf['image_feature_shape']}, "
        f"max |diff| {report['vision_features_max_abs_diff']}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
