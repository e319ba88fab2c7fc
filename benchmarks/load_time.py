"""Build a Llama-3.2-1B-shaped engine (random weights) and time a cold load to the first token.

    python benchmarks/load_time.py --workdir /tmp/kiln-load [--config llama-3.2-1b]

Steps, each timed: write a random-weight checkpoint with the real architecture's config; `kiln
build` it (bf16, CUDA, Inductor); then, in a fresh Python process, import kiln, load the engine
and generate the first token of a 128-token prompt; then decode 256 tokens for a rough speed.
Prints one JSON line per step and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}

FIRST_TOKEN = r"""
import cProfile, json, pstats, sys, time
t0 = time.perf_counter()
profile = cProfile.Profile() if sys.argv[2] == "1" else None
if profile:
    profile.enable()
import torch
from kiln import LLM, SamplingParams
llm = LLM(sys.argv[1])
t_load = time.perf_counter()
if profile:
    profile.disable()
    pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
prompt = [int(x) for x in torch.randint(1000, 100000, (128,), generator=torch.Generator().manual_seed(0))]
out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
torch.cuda.synchronize()
t_first = time.perf_counter()
out = llm.generate([prompt], SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True))
torch.cuda.synchronize()
t_decode = time.perf_counter()
print(json.dumps({"load_s": t_load - t0, "first_token_s": t_first - t0, "decode_256_s": t_decode - t_first,
                  "decode_tok_s": 255 / (t_decode - t_first - out[0].metrics["time_to_first_token_s"])}))
"""


def make_checkpoint(name: str, path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_checkpoints import make_tokenizer

    config = LlamaConfig(**CONFIGS[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--config", default="llama-3.2-1b", choices=sorted(CONFIGS))
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the cold load to stderr")
    args = ap.parse_args()
    ckpt, engine = args.workdir / f"{args.config}-ckpt", args.workdir / f"{args.config}-engine"
    results: dict[str, float] = {}
    t = time.perf_counter()
    make_checkpoint(args.config, ckpt)
    results["checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln",
            "build",
            str(ckpt),
            "-o",
            str(engine),
            "--dtype",
            "bfloat16",
            "--device",
            "cuda",
            "--max-batch-size",
            "8",
            "--max-seq-len",
            "4096",
            "--max-input-len",
            "2048",
            "--max-num-tokens",
            "4096",
        ],
        check=True,
    )
    results["build_s"] = time.perf_counter() - t
    manifest = json.loads((engine / "manifest.json").read_text())
    results.update({f"build_{k}_s": v for k, v in manifest["timings_s"].items()})
    run = subprocess.run(
        [sys.executable, "-c", FIRST_TOKEN, str(engine), "1" if args.profile else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    print(run.stderr[-12000:] if args.profile else run.stderr[-2000:], file=sys.stderr)
    results.update(json.loads(run.stdout.strip().splitlines()[-1]))
    print(json.dumps({"config": args.config, **{k: round(v, 3) for k, v in results.items()}}))
    for key, value in results.items():
        print(f"{key:28s} {value:10.2f}")


if __name__ == "__main__":
    main()
