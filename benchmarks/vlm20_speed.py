"""Issue 20's speed check: Nougat-base, BLIP-2-Flan-T5-XL and Fuyu-8B shapes (random weights), kiln beside transformers.

    python benchmarks/vlm20_speed.py --workdir /tmp/kiln-vlm20 --device cuda --out vlm20_speed.json
    python benchmarks/vlm20_speed.py --workdir /tmp/kiln-vlm20-tiny --device cpu --new-tokens 32 \
        --models nougat-tiny blip2-t5-tiny fuyu-tiny

For each model: write a random-weight checkpoint of the real architecture (configs below; the
tokenizer is a small one of the tests', so generated ids past its vocabulary decode to nothing) with
its processor, unless it exists; `kiln build` it (unless built); then in this process, kiln first and
transformers (eager attention, after kiln's memory is freed) second, one image per request:

- vision encoder time: kiln's vision program through the pipeline's encode path vs the same modules
  of transformers' model (Nougat: the Swin encoder; BLIP-2: ViT-g + Q-Former + projection; Fuyu: the
  patch linear); median of synchronized runs after warm-up;
- time to first token, preprocessing included (`max_tokens=1`; a new image each run, prefix caching off);
- end-to-end latency of one image and 128 output tokens (EOS ignored: transformers' `min_new_tokens`);
- decode ms/token: kiln's own step timings; transformers' (end-to-end - TTFT) / 127.

The target of issue 20 is >= 2x transformers on the end-to-end latency. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vlm_speed import free_memory, ms, timed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

NEW_TOKENS = 128  # --new-tokens (the tiny models' positions hold fewer)
VISION_RUNS, TTFT_RUNS, E2E_RUNS, WARMUP = 10, 5, 3, 2


@dataclass(frozen=True)
class Model:
    prompt: str
    image: tuple[int, int]  # (height, width) of the random image
    limits: tuple[str, ...]  # kiln build flags
    hf_class: str


MODELS = {
    "nougat-base": Model(
        "",
        (1000, 760),
        ("--max-batch-size", "4", "--max-input-len", "1024", "--max-seq-len", "512", "--max-num-tokens", "2048"),
        "VisionEncoderDecoderModel",
    ),  # fmt: skip
    "blip2-flan-t5-xl": Model(
        "Question: what is shown? Answer:",
        (480, 640),
        ("--max-batch-size", "4", "--max-input-len", "256", "--max-seq-len", "512"),
        "Blip2ForConditionalGeneration",
    ),  # fmt: skip
    "fuyu-8b": Model(
        "Generate a coco-style caption.\n",
        (480, 640),
        ("--max-batch-size", "4", "--max-input-len", "1024", "--max-seq-len", "2048", "--max-num-tokens", "2048"),
        "FuyuForCausalLM",
    ),  # fmt: skip
    # tiny stand-ins (the tests' checkpoints) to check this script on a CPU
    "nougat-tiny": Model(
        "",
        (40, 30),
        ("--max-batch-size", "4", "--max-input-len", "32", "--max-seq-len", "64", "--max-num-tokens", "96"),
        "VisionEncoderDecoderModel",
    ),  # fmt: skip
    "blip2-t5-tiny": Model(
        "Question: what is it?",
        (40, 40),
        ("--max-batch-size", "4", "--max-input-len", "32", "--max-seq-len", "64", "--max-num-tokens", "96"),
        "Blip2ForConditionalGeneration",
    ),  # fmt: skip
    "fuyu-tiny": Model(
        "The kiln",
        (40, 60),
        ("--max-batch-size", "4", "--max-input-len", "96", "--max-seq-len", "256", "--max-num-tokens", "256"),
        "FuyuForCausalLM",
    ),  # fmt: skip
}


# ---- checkpoints ----------------------------------------------------------------------------------


def _nougat_base() -> tuple[Any, Any]:
    from tiny_checkpoints import make_tokenizer
    from transformers import (
        DonutImageProcessor,
        DonutProcessor,
        DonutSwinConfig,
        MBartConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    encoder = DonutSwinConfig(
        image_size=[896, 672], patch_size=4, embed_dim=128, depths=[2, 2, 14, 2], num_heads=[4, 8, 16, 32],
        window_size=7,
    )  # fmt: skip
    decoder = MBartConfig(
        vocab_size=50000, d_model=1024, decoder_layers=10, decoder_attention_heads=16, decoder_ffn_dim=4096,
        encoder_layers=0, max_position_embeddings=4096, scale_embedding=True, is_decoder=True,
        add_cross_attention=True, bos_token_id=1, pad_token_id=0, eos_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    images = DonutImageProcessor(size={"height": 896, "width": 672}, do_align_long_axis=False, do_thumbnail=False)
    return VisionEncoderDecoderModel(config), DonutProcessor(image_processor=images, tokenizer=make_tokenizer())


def _blip2_flan_t5_xl() -> tuple[Any, Any]:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        T5Config,
    )
    from vlm_checkpoints import tokenizer_with

    tok = tokenizer_with("<image>")
    text = T5Config(
        vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=Blip2VisionConfig(),  # ViT-g/14 at 224 px
        qformer_config=Blip2QFormerConfig(),
        text_config=text,
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    images = BlipImageProcessor(size={"height": 224, "width": 224})
    processor = Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=32)
    return Blip2ForConditionalGeneration(config), processor


def _fuyu_8b() -> tuple[Any, Any]:
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessor, FuyuProcessor, PersimmonConfig
    from vlm_more_checkpoints import fuyu_tokenizer

    tok = fuyu_tokenizer()
    text = PersimmonConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Persimmon-8B's defaults
    config = FuyuConfig(
        text_config=text, hidden_size=text.hidden_size, image_token_id=tok.convert_tokens_to_ids("|SPEAKER|")
    )
    return FuyuForCausalLM(config), FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=tok)


REAL = {"nougat-base": _nougat_base, "blip2-flan-t5-xl": _blip2_flan_t5_xl, "fuyu-8b": _fuyu_8b}


def make_checkpoint(name: str, path: Path, device: torch.device) -> float | None:
    """Seconds spent writing the checkpoint, or None when it exists (written to a staging dir, then renamed)."""
    if path.is_dir():
        return None
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    if name == "nougat-tiny":
        from encdec_checkpoints import make_donut_checkpoint

        make_donut_checkpoint(staging)
    elif name == "blip2-t5-tiny":
        from encdec_checkpoints import make_blip2_t5_checkpoint

        make_blip2_t5_checkpoint(staging)
    elif name == "fuyu-tiny":
        from vlm_checkpoints import make_vlm_checkpoint

        make_vlm_checkpoint("fuyu", staging)
    else:
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # created in bf16 on the device: no float32 copy of the weights
        try:
            with torch.device(device):
                model, processor = REAL[name]()
        finally:
            torch.set_default_dtype(previous)
        model.to(torch.bfloat16).eval().save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        del model
        free_memory(device)
    staging.rename(path)
    return time.perf_counter() - start


def build_engine(name: str, ckpt: Path, engine: Path, device: str, dtype: str) -> float | None:
    """Seconds `kiln build` took, or None when the engine exists (kiln writes manifest.json last)."""
    if (engine / "manifest.json").is_file():
        return None
    command = [sys.executable, "-m", "kiln", "build", str(ckpt), "-o", str(engine), "--dtype", dtype]
    command += ["--device", device, *MODELS[name].limits]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


# ---- measuring ------------------------------------------------------------------------------------


def random_image(seed: int, size: tuple[int, int]) -> Any:
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def measure_kiln(name: str, engine: Path, device: torch.device, new_tokens: int) -> dict[str, Any]:
    from kiln import LLM, SamplingParams

    spec = MODELS[name]
    llm = LLM(engine, enable_prefix_caching=False)
    pipe = llm.engine.multimodal
    assert pipe is not None, f"{engine} is not a vision-language engine"
    facts = pipe.facts
    processed = pipe.family.process(pipe.processor, spec.prompt, [random_image(0, spec.image)], facts.family_config)
    items = [item.to(pipe.device, pipe.dtype) for item in pipe.family.split_images(processed, facts.family_config)]

    def encode(_: int) -> Any:
        with torch.inference_mode():
            return pipe.family.encode(pipe.program, items, facts.vision_batch_limit, pipe.state, facts.family_config)

    def request(i: int) -> list[dict[str, Any]]:
        return [{"prompt": spec.prompt, "images": [random_image(1000 + i, spec.image)]}]

    vision = timed(encode, VISION_RUNS, WARMUP, device)
    first = SamplingParams(max_tokens=1, temperature=0.0)
    ttft = timed(lambda i: llm.generate(request(i), first), TTFT_RUNS, WARMUP, device)
    full = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    per_token: list[float] = []

    def e2e_call(i: int) -> None:
        out = llm.generate(request(2000 + i), full)
        assert len(out[0].token_ids) == new_tokens
        per_token.append(llm.last_profile["per_token_s"])

    e2e = timed(e2e_call, E2E_RUNS, 1, device)
    return {
        "vision_ms": ms(vision),
        "ttft_ms": ms(ttft),
        "e2e_ms": ms(e2e),
        "decode_ms_per_token": ms(per_token[1:]),
        "encoder_decoder": llm.engine.encoder_decoder is not None,
    }


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device, dtype) for v in value)
    return value


def measure_transformers(
    name: str, ckpt: Path, device: torch.device, dtype: torch.dtype, new_tokens: int
) -> dict[str, Any]:
    import transformers

    spec = MODELS[name]
    model_class = getattr(transformers, spec.hf_class)
    model = model_class.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager").to(device).eval()
    from kiln.models.vlm import family_for

    processor = family_for(spec.hf_class).load_processor(ckpt)  # transformers' own, with kiln's fixes (Fuyu)

    def inputs_for(image: Any) -> dict[str, Any]:
        text = {"text": [spec.prompt]} if spec.prompt else {}
        return {k: _to(v, device, dtype) for k, v in processor(images=[image], return_tensors="pt", **text).items()}

    probe = inputs_for(random_image(0, spec.image))

    def encode(_: int) -> Any:
        with torch.inference_mode():
            if spec.hf_class == "VisionEncoderDecoderModel":
                return model.encoder(pixel_values=probe["pixel_values"])
            if spec.hf_class == "Blip2ForConditionalGeneration":
                return model.get_image_features(pixel_values=probe["pixel_values"])
            from kiln.models.vlm.fuyu import image_patches

            return model.model.vision_embed_tokens(image_patches(probe))

    def generate(i: int, new: int) -> Any:
        with torch.inference_mode():
            inputs = inputs_for(random_image(1000 + i, spec.image))
            return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    vision = timed(encode, VISION_RUNS, WARMUP, device)
    ttft = timed(lambda i: generate(i, 1), TTFT_RUNS, WARMUP, device)
    e2e = timed(lambda i: generate(2000 + i, new_tokens), E2E_RUNS, 1, device)
    return {
        "vision_ms": ms(vision),
        "ttft_ms": ms(ttft),
        "e2e_ms": ms(e2e),
        "decode_ms_per_token": (ms(e2e) - ms(ttft)) / (new_tokens - 1),
    }


def print_table(rows: dict[str, dict[str, Any]], new_tokens: int) -> None:
    head = f"{'model':18s} {'system':13s} {'vision ms':>10s} {'TTFT ms':>9s} {'decode ms/tok':>14s} {'e2e ms':>9s}"
    print("\n" + head + f" {'e2e speedup':>12s}")
    for name, row in rows.items():
        for system in ("kiln", "transformers"):
            r = row[system]
            speedup = row["transformers"]["e2e_ms"] / row["kiln"]["e2e_ms"] if system == "kiln" else 1.0
            print(
                f"{name:18s} {system:13s} {r['vision_ms']:10.2f} {r['ttft_ms']:9.2f} "
                f"{r['decode_ms_per_token']:14.2f} {r['e2e_ms']:9.1f} {speedup:11.2f}x"
            )
    print(f"(one image, {new_tokens} new tokens, batch 1; e2e speedup = transformers / kiln; target >= 2x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["nougat-base", "blip2-flan-t5-xl", "fuyu-8b"], choices=MODELS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, default=Path("vlm20_speed.json"))
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --models nougat-tiny ... --device cpu for a CPU check)")
    device = torch.device(args.device)
    dtype_name = "bfloat16" if args.device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.models:
        ckpt = args.workdir / f"{name}-ckpt"
        engine = args.workdir / f"{name}-engine-{args.device}-{dtype_name}"
        made = make_checkpoint(name, ckpt, device)
        built = build_engine(name, ckpt, engine, args.device, dtype_name)
        kiln = measure_kiln(name, engine, device, args.new_tokens)
        free_memory(device)
        hf = measure_transformers(name, ckpt, device, dtype, args.new_tokens)
        free_memory(device)
        rows[name] = {"kiln": kiln, "transformers": hf, "checkpoint_s": made, "build_s": built}
        print(json.dumps({name: rows[name]}), flush=True)
    import transformers

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "new_tokens": args.new_tokens,
        "models": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows, args.new_tokens)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
