#!/usr/bin/env bash
# FP8 / INT8 compute and the narrow KV cache on one GPU, in calls of the device tool:
#   bash scripts/device_fp8.sh tests                 # every CUDA test of the FP8 GEMV, the W8A8 GEMMs, the
#                                                    # narrow-KV Triton attention kernels (and CUDA graphs)
#   bash scripts/device_fp8.sh ckpt bf16 fp8 fp8-kv  # a random-weight Llama-3.1-8B checkpoint, then each
#                                                    # engine built (once: kept in $WORK) and benched
#   bash scripts/device_fp8.sh prefix table          # bf16-vs-fp8 identical greedy prefix; the table
#   bash scripts/device_fp8.sh gemv                  # one-row linears of Llama-3.1-8B: bf16 vs the FP8 GEMV
#                                                    # vs torch._scaled_mm (benchmarks/fp8_linear.py, plain and fused)
# An engine step benches what BENCHES names (default: "b1 tput rows"):
#   b1   batch 1, 128 in / 256 out (ms per output token)
#   tput NUM_REQUESTS (default 1000) requests x 1000 in / 1000 out (output tok/s)
#   rows NUM_REQUESTS requests x 128 / 2048 and x 2048 / 128 (TensorRT-LLM's FP8 table: 22,714 and 3,450 tok/s)
# The steps take minutes each on an H100: split them over calls (10 minutes a call) while the machine
# stays warm; `table` reads every bench.json under $OUT so far. Results land in $OUT (or ./device-out).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=${WORK:-/tmp/kiln-fp8}; mkdir -p "$work"
requests=${NUM_REQUESTS:-1000}
ck="$work/8b-ckpt"
bench() {  # bench engine-variant label input output [--throughput]
  python -m kiln bench "$work/8b-$1" --batch-sizes 1 --input-len "$3" --output-len "$4" "${@:5}" \
      --output-dir "$out/8b-$1-$2" 2>&1 | grep -v -i warn | tail -n 6
}
engine() {  # build (once) and bench one variant: bf16, fp8 (W8A8 per token) or fp8-kv (fp8 + FP8 KV cache)
  local variant=$1 opts=() t0
  case $variant in
    fp8) opts=(--quantization fp8) ;;
    fp8-kv) opts=(--quantization fp8 --kv-cache-dtype fp8) ;;
  esac
  if [ ! -d "$work/8b-$variant" ]; then
    t0=$(date +%s)
    python -m kiln build "$ck" -o "$work/8b-$variant" --dtype bfloat16 --device cuda --max-batch-size 256 \
        --max-seq-len 2304 --max-input-len 2048 --max-num-tokens 8192 "${opts[@]}" 2>&1 | grep -v -i warn | tail -n 3
    echo "build 8b-$variant: $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
  fi
  for b in ${BENCHES:-b1 tput rows}; do
    case $b in
      b1) bench "$variant" b1 128 256 ;;
      tput) bench "$variant" tput 1000 1000 --throughput --num-requests "$requests" ;;
      rows) bench "$variant" r128x2048 128 2048 --throughput --num-requests "$requests"
            bench "$variant" r2048x128 2048 128 --throughput --num-requests "$requests" ;;
    esac
  done
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
table() {
  python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def first(path, key):
    rows = json.loads(path.read_text()).get(key, []) if path.exists() else []
    return [r for r in rows if r.get("system", "kiln") == "kiln"][:1]
print("engine | b1 ms/token | 1000x1000/1000 tok/s | 128/2048 tok/s | 2048/128 tok/s | KV tokens")
for name in sorted({p.parent.name.rsplit("-", 1)[0] for p in out.glob("8b-*/bench.json")}):
    lat = first(out / f"{name}-b1" / "bench.json", "latency")
    cells = [f"{lat[0]['ms_per_token']:.3f}" if lat else "-"]
    kv = "-"
    for label in ("tput", "r128x2048", "r2048x128"):
        tput = first(out / f"{name}-{label}" / "bench.json", "throughput")
        cells.append(f"{tput[0]['output_tokens_per_s']:.0f}" if tput else "-")
        if tput and kv == "-":
            kv = f"{tput[0].get('kv_cache_tokens', '-')} ({tput[0].get('kv_cache_dtype', 'auto')})"
    print(" | ".join([name, *cells, kv]))
PY
}
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python -m pytest -q tests/kernels/test_fp8_gemv.py tests/kernels/test_narrow_kv_attention.py \
             tests/kernels/test_w8a8.py tests/kernels/test_kv_quant.py tests/kernels/test_triton_attention.py \
             tests/kernels/test_quantized_kernels.py tests/unit/test_quantized_linear_ops.py 2>&1 | tail -n 15 ;;
    ckpt) [ -d "$ck" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); \
from load_time import make_checkpoint; make_checkpoint('llama-3.1-8b', Path('$ck'))" ;;
    bf16|fp8|fp8-kv) engine "$step" ;;
    gemv) python benchmarks/fp8_linear.py --models 8b 2>&1 | tee "$out/fp8-linear.txt"
          python benchmarks/fp8_linear.py --models 8b --fused 2>&1 | tee "$out/fp8-linear-fused.txt" ;;
    prefix) prefixes "$work/8b-bf16" "$work/8b-fp8" | tee "$out/8b-identical-prefix.txt" ;;
    table) table | tee "$out/table.txt" ;;
    clean) rm -rf "$work" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
exit 0
