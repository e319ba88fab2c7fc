#!/usr/bin/env bash
# Weight-only quantization on one GPU, in one call of the device tool:
#   bash scripts/device_quant.sh tests linear e2e8b e2e1b
# tests:  the quantized kernel tests (CUDA cases included)
# linear: one-row linear timings, bf16 vs int8 vs int4 g128 (benchmarks/quantized_linear.py)
# e2e8b / e2e1b: random-weight Llama-3.1-8B / 3.2-1B checkpoints built bf16, int8_wo and int4_wo (g128),
#         each benched at batch 1 (128 in / 256 out); a table at the end (ms/token, weight MB/token, % of copy BW).
#         The 8B engines are built for batch 256 and kept under $WORK for tp8b (on a machine still warm).
# profile1b: a 1B quantized engine (PROFILE_VARIANT, int4_wo) profiled over 5 decode steps (decode_profile.py)
# tp8b:   the kept 8B engines (built again where missing) at 1,000 x 1,000/1,000 (TP_N requests)
# Results land in $OUT (or ./device-out).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=${WORK:-/tmp/kiln-quant}; mkdir -p "$work"
checkpoint() {  # a random-weight checkpoint of config $1 at $2
  [ -d "$2" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); \
from load_time import make_checkpoint; make_checkpoint('$1', Path('$2'))"
}
build() {  # build engine-dir checkpoint variant max-batch-size
  [ -d "$1" ] && return
  local opts=() t0; t0=$(date +%s)
  [ "$3" != bf16 ] && opts=(--quantization "$3" --group-size 128)
  python -m kiln build "$2" -o "$1" --dtype bfloat16 --device cuda --max-batch-size "$4" \
      --max-seq-len 2048 --max-input-len 1024 --max-num-tokens 8192 "${opts[@]}" 2>&1 | grep -v -i warn | tail -n 2
  echo "build $(basename "$1"): $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
}
engines() {  # engines model-name checkpoint max-batch-size keep: bf16, int8_wo, int4_wo g128, each benched at batch 1
  local name=$1 ck=$2 variant
  for variant in bf16 int8_wo int4_wo; do
    build "$work/$name-$variant" "$ck" "$variant" "$3"
    python -m kiln bench "$work/$name-$variant" --batch-sizes 1 --input-len 128 --output-len 256 \
        --output-dir "$out/$name-$variant" 2>&1 | grep -v -i warn | tail -n 4
    [ "$4" = keep ] || rm -rf "$work/$name-$variant"
  done
}
for step in "$@"; do
  start=$(date +%s)
  case $step in
    tests) python -m pytest -q -x tests/kernels/test_quantized_kernels.py tests/kernels/test_quantized_weight.py \
             tests/unit/test_quantized_linear_ops.py 2>&1 | tail -n 15 ;;
    linear) python benchmarks/quantized_linear.py ${LINEAR_ARGS:-} 2>&1 | tail -n 40 | tee "$out/quantized_linear.txt" ;;
    profile1b)  # one quantized 1B engine (PROFILE_VARIANT, int4_wo by default) profiled over 5 decode steps
      checkpoint llama-3.2-1b "$work/1b-ckpt"; build "$work/1b-${PROFILE_VARIANT:-int4_wo}" "$work/1b-ckpt" "${PROFILE_VARIANT:-int4_wo}" 8
      python benchmarks/decode_profile.py "$work/1b-${PROFILE_VARIANT:-int4_wo}" --no-graph-run --top 25 2>&1 \
          | grep -v -i warn | tee "$out/profile-1b-${PROFILE_VARIANT:-int4_wo}.txt" ;;
    e2e8b) checkpoint llama-3.1-8b "$work/8b-ckpt"; engines 8b "$work/8b-ckpt" 256 keep; rm -rf "$work/8b-ckpt" ;;
    e2e1b) checkpoint llama-3.2-1b "$work/1b-ckpt"; engines 1b "$work/1b-ckpt" 8 drop; rm -rf "$work/1b-ckpt" ;;
    tp8b)
      for variant in ${TP_VARIANTS:-int8_wo bf16 int4_wo}; do
        if [ ! -d "$work/8b-$variant" ]; then
          checkpoint llama-3.1-8b "$work/8b-ckpt"; build "$work/8b-$variant" "$work/8b-ckpt" "$variant" 256
        fi
        python -m kiln bench "$work/8b-$variant" --batch-sizes 1 --input-len 1000 --output-len 1000 --throughput \
            --num-requests "${TP_N:-1000}" --output-dir "$out/tp8b-$variant" 2>&1 | grep -v -i warn | tail -n 8
      done
      rm -rf "$work/8b-ckpt" ;;
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
    for r in report.get("throughput", []):
        print(f"{path.parent.name} | {r['num_requests']} x {r['input_len']}/{r['output_len']} | "
              f"{r['output_tokens_per_s']:.0f} output tok/s | {r['total_s']:.1f} s")
PY
exit 0
