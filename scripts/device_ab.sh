#!/usr/bin/env bash
# A/B of two kiln trees on one GPU machine: each tree builds its own engines from the same
# random-weight checkpoints (real Llama-3.2-1B / Llama-3.1-8B configs), then both are benchmarked
# alternately, so that the ratio new/old is measured on one machine in one run.
#   OLD=.ab/old bash scripts/device_ab.sh ab1b prep8b      # 1B batch 1 (ROUNDS rounds, default 2), then the 8B engines
#   OLD=.ab/old bash scripts/device_ab.sh tp8b              # 8B: batch 1 + 1,000 x 1,000/1,000 throughput
#   bash scripts/device_ab.sh table                        # the summary of everything under $OUT
# OLD is a copy of the old tree (e.g. `git archive <commit> | tar -x -C .ab/old`); the new tree is the
# working directory. DEVICE, MAX_SEQ, MAX_IN and CKPT_1B (an existing checkpoint) try it on a CPU. Results land in $OUT (or ./device-out): bench JSON per run and a table at the end.
set -uo pipefail
new=$PWD; old=$(cd "${OLD:-.ab/old}" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=${WORK:-/tmp/kiln-ab}; mkdir -p "$work"
kiln() {  # kiln of tree $1 (old|new), the remaining arguments passed on
  local tree=$old; [ "$1" = new ] && tree=$new; shift
  (cd "$tree" && PYTHONPATH=$tree python -m kiln "$@")
}
checkpoint() {  # a random-weight checkpoint of config $1 at $2, unless one is there
  [ -d "$2" ] || (cd "$new" && PYTHONPATH=$new python -c "import sys; from pathlib import Path; \
sys.path.insert(0, 'benchmarks'); from load_time import make_checkpoint; make_checkpoint('$1', Path('$2'))")
}
build() {  # build() tree checkpoint engine max-batch-size
  [ -d "$3" ] && return
  local t0; t0=$(date +%s)
  kiln "$1" build "$2" -o "$3" --dtype bfloat16 --device "${DEVICE:-cuda}" --max-batch-size "$4" \
      --max-seq-len "${MAX_SEQ:-2048}" --max-input-len "${MAX_IN:-1024}" --max-num-tokens 8192 2>&1 | grep -v -i warn | tail -n 3
  echo "build $1 $(basename "$3"): $(( $(date +%s) - t0 )) s" | tee -a "$out/steps.txt"
}
for step in "$@"; do
  start=$(date +%s)
  case $step in
    ab1b)
      ck=${CKPT_1B:-$work/llama-3.2-1b-ckpt}; checkpoint llama-3.2-1b "$ck"
      for tree in old new; do build "$tree" "$ck" "$work/1b-$tree" 64; done
      for round in $(seq "${ROUNDS:-2}"); do
        for tree in old new; do
          kiln "$tree" bench "$work/1b-$tree" --batch-sizes 1 --input-len 128 --output-len 256 \
              --output-dir "$out/ab1b_${tree}_$round" 2>&1 | grep -E "ms/token|kiln " | tail -n 2
        done
      done
      rm -rf "$work/1b-old" "$work/1b-new"; [ -z "${CKPT_1B:-}" ] && rm -rf "$ck" ;;
    prep8b)
      [ -d "$work/8b-old" ] && [ -d "$work/8b-new" ] && continue
      ck=$work/llama-3.1-8b-ckpt; checkpoint llama-3.1-8b "$ck"
      for tree in old new; do build "$tree" "$ck" "$work/8b-$tree" 256; done
      rm -rf "$ck" ;;
    tp8b)
      for tree in ${TP_ORDER:-old new}; do
        kiln "$tree" bench "$work/8b-$tree" --batch-sizes 1 --input-len 1000 --output-len 1000 --throughput \
            --num-requests "${TP_N:-1000}" --output-dir "$out/tp8b_$tree" 2>&1 | grep -v -i warn | tail -n 12
      done ;;
    table) ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for path in sorted(out.glob("*/bench.json")):
    report = json.loads(path.read_text())
    for r in report.get("latency", []):
        if r["system"] == "kiln":
            frac = r["step_bytes"] / (r["ms_per_token"] / 1000) / (report["copy_gb_s"] * 1e9)
            rows.append((path.parent.name, f"batch {r['batch']}", f"{r['ms_per_token']:.3f} ms/token", f"{frac:.0%} of copy BW"))
    for r in report.get("throughput", []):
        rows.append((path.parent.name, f"{r['num_requests']} x {r['input_len']}/{r['output_len']}",
                     f"{r['output_tokens_per_s']:.0f} output tok/s", f"{r['total_s']:.1f} s"))
print("--- A/B results (old = the tree in $OLD, new = this tree)")
for row in rows:
    print(" | ".join(row))
PY
[ -f "$out/steps.txt" ] && cat "$out/steps.txt"
exit 0
