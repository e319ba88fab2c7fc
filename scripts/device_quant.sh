#!/usr/bin/env bash
# Weight-only quantization on one GPU, in one call of the device tool:
#   bash scripts/device_quant.sh tests linear e2e8b e2e1b
# tests:  the quantized kernel tests (CUDA cases included)
# linear: one-row linear timings, bf16 vs int8 vs int4 g128 (benchmarks/quantized_linear.py)
# e2e8b / e2e1b: random-weight Llama-3.1-8B / 3.2-1B checkpoints built bf16, int8_wo and int4_wo (g128),
#         each benched at batch 1 (128 in / 256 out); a table at the end (ms/token, weight MB/token, % of copy BW)
# Results land in $OUT (or ./device-out).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=${WORK:-/tmp/kiln-quant}; mkdir -p "$work"
checkpoint() {  # a random-weight checkpoint of config $1 at $2
  [ -d "$2" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); \
from load_time import make_checkpoint; make_checkpoint('$1', Path('$2'))"
}
engines() {  # engines model-name checkpoint: bf16, int8_wo, int4_wo g128 builds, then batch-1 benches
  local name=$1 ck=$2 variant
  for variant in bf16 int8_wo int4_wo; do
    local opts=() t0; t0=$(date +%s)
    [ "$variant" != bf16 ] && opts=(--quantization "$variant" --group-size 128)
    python -m kiln build "$ck" -o "$work/$name-$variant" --dtype bfloat16 --device cuda --max-batch-size 8 \
        --max-seq-len 2048 --max-input-len 1024 --max-num-tokens 2048 "${opts[@]}" 2>&1 | grep -v -i warn | tail -n 2
    echo "build $name-$variant: $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
    python -m kiln bench "$work/$name-$variant" --batch-sizes 1 --input-len 128 --output-len 256 \
        --output-dir "$out/$name-$variant" 2>&1 | grep -v -i warn | tail -n 4
    rm -rf "$work/$name-$variant"
  done
}
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python -m pytest -q -x tests/kernels/test_quantized_kernels.py tests/kernels/test_quantized_weight.py \
             tests/unit/test_quantized_linear_ops.py 2>&1 | tail -n 15 ;;
    linear) python benchmarks/quantized_linear.py 2>&1 | tail -n 40 | tee "$out/quantized_linear.txt" ;;
    e2e8b) checkpoint llama-3.1-8b "$work/8b-ckpt"; engines 8b "$work/8b-ckpt"; rm -rf "$work/8b-ckpt" ;;
    e2e1b) checkpoint llama-3.2-1b "$work/1b-ckpt"; engines 1b "$work/1b-ckpt"; rm -rf "$work/1b-ckpt" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("engine | ms/token | tok/s | weight MB/token | % of copy BW")
for path in sorted(out.glob("*/bench.json")):
    report = json.loads(path.read_text())
    for r in report.get("latency", []):
        if r["system"] == "kiln":
            frac = r["step_bytes"] / (r["ms_per_token"] / 1000) / (report["copy_gb_s"] * 1e9)
            print(f"{path.parent.name} | {r['ms_per_token']:.3f} | {1000 / r['ms_per_token']:.0f} | "
                  f"{r['step_bytes'] / 1e6:.0f} | {frac:.0%}")
PY
exit 0
