#!/usr/bin/env bash
# FP8 / INT8 compute and the narrow KV cache on one GPU, in one call of the device tool:
#   bash scripts/device_fp8.sh tests e2e8b
# tests: the W8A8 and KV-cache tests (the CUDA torch._scaled_mm cases run on a GPU of capability 8.9+)
# e2e8b: a random-weight Llama-3.1-8B checkpoint built bf16 and fp8 (W8A8 per token); add fp8-kv to VARIANTS
#        (fp8 + fp8 KV cache) once the Triton attention kernels read a narrow cache (a CUDA build refuses it now),
#        each benched at batch 1 (128 in / 256 out) and 1000 requests x 1000 in / 1000 out (throughput);
#        a table at the end (ms/token at batch 1, output tok/s at 1000 x 1000/1000, KV tokens), and the
#        identical greedy prefix of the bf16 and fp8 engines on 8 random prompts
# Results land in $OUT (or ./device-out).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=${WORK:-/tmp/kiln-fp8}; mkdir -p "$work"
checkpoint() {  # a random-weight checkpoint of config $1 at $2
  [ -d "$2" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); \
from load_time import make_checkpoint; make_checkpoint('$1', Path('$2'))"
}
engines() {  # engines model-name checkpoint: bf16, fp8, fp8 + fp8 KV builds, then the two benches each
  local name=$1 ck=$2 variant
  for variant in ${VARIANTS:-bf16 fp8}; do
    local opts=() t0; t0=$(date +%s)
    case $variant in
      fp8) opts=(--quantization fp8) ;;
      fp8-kv) opts=(--quantization fp8 --kv-cache-dtype fp8) ;;
    esac
    python -m kiln build "$ck" -o "$work/$name-$variant" --dtype bfloat16 --device cuda --max-batch-size 256 \
        --max-seq-len 2048 --max-input-len 1024 --max-num-tokens 8192 "${opts[@]}" 2>&1 | grep -v -i warn | tail -n 3
    echo "build $name-$variant: $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
    python -m kiln bench "$work/$name-$variant" --batch-sizes 1 --input-len 128 --output-len 256 \
        --output-dir "$out/$name-$variant-b1" 2>&1 | grep -v -i warn | tail -n 4
    python -m kiln bench "$work/$name-$variant" --batch-sizes 1 --input-len 1000 --output-len 1000 --throughput \
        --num-requests 1000 --output-dir "$out/$name-$variant-tput" 2>&1 | grep -v -i warn | tail -n 8
  done
  prefixes "$work/$name-bf16" "$work/$name-fp8" | tee "$out/$name-identical-prefix.txt"
  rm -rf "$work/$name-bf16" "$work/$name-fp8" "$work/$name-fp8-kv"
}
prefixes() {  # greedy tokens of two engines on the same prompts: the length of their identical prefix
  python - "$1" "$2" <<'PY'
import sys, torch
from kiln import LLM, SamplingParams
prompts = [torch.randint(0, 32000, (64,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
runs = []
for engine in sys.argv[1:]:
    llm = LLM(engine)
    runs.append([o.token_ids for o in llm.generate(prompts, params)])
    del llm
same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(*runs)]
print(f"identical greedy prefix (of 128 tokens), {sys.argv[1]} vs {sys.argv[2]}: {same}")
PY
}
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python -m pytest -q tests/kernels/test_w8a8.py tests/kernels/test_kv_quant.py \
             tests/kernels/test_quantized_kernels.py tests/unit/test_quantized_linear_ops.py 2>&1 | tail -n 15 ;;
    e2e8b) checkpoint llama-3.1-8b "$work/8b-ckpt"; engines 8b "$work/8b-ckpt"; rm -rf "$work/8b-ckpt" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("engine | batch-1 ms/token | 1000x1000/1000 output tok/s | KV tokens")
for path in sorted(out.glob("*-b1/bench.json")):
    name = path.parent.name.removesuffix("-b1")
    lat = [r for r in json.loads(path.read_text()).get("latency", []) if r["system"] == "kiln"]
    tput_path = out / f"{name}-tput" / "bench.json"
    tput = [r for r in json.loads(tput_path.read_text()).get("throughput", [])] if tput_path.exists() else []
    ms = f"{lat[0]['ms_per_token']:.3f}" if lat else "-"
    tok = f"{tput[0]['output_tokens_per_s']:.0f}" if tput else "-"
    kv = f"{tput[0].get('kv_cache_tokens', '-')} ({tput[0].get('kv_cache_dtype', 'auto')})" if tput else "-"
    print(f"{name} | {ms} | {tok} | {kv}")
PY
exit 0
