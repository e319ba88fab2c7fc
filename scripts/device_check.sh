#!/usr/bin/env bash
# The GPU checks of issue 2 in one call of the device machine (torch 2.11, transformers 5.17):
#   bash scripts/device_check.sh [families|compiled|load|cpu ...]   (default: families load compiled)
# Results land in $OUT (or ./device-out): logs, JSON lines, and a short table at the end.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-device-out}; mkdir -p "$out"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(families load compiled)
python - <<'PY' | tee "$out/env.txt"
import torch, transformers, triton
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PY
checkpoint() {  # a random-weight checkpoint of config $1 at $2, unless one is there
  [ -d "$2" ] || python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from load_time import make_checkpoint; make_checkpoint('$1', Path('$2'))"
}
variant_engine() {  # a 1B engine built with the extra `kiln build` flags $1 (--no-pdl,--no-fuse-rope) at $2, unless there
  [ -d "$2" ] || python -m kiln build /tmp/kiln-bench/llama-3.2-1b-ckpt -o "$2" --dtype bfloat16 --device cuda \
      --max-batch-size 64 --max-seq-len 2048 --max-input-len 1024 --max-num-tokens 8192 ${1//,/ } 2>&1 | tail -n 2
}
for step in "${steps[@]}"; do
  start=$(date +%s)
  case $step in
    families) KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16 KILN_FAMILY_REPORT=$out/families_bf16.jsonl \
                python -m pytest -q -p no:cacheprovider tests/models/test_families.py 2>&1 | tail -n 25 | tee "$out/families_bf16.log" ;;
    compiled) KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16 KILN_TEST_COMPILE=1 KILN_FAMILY_REPORT=$out/families_bf16_compiled.jsonl \
                python -m pytest -q -p no:cacheprovider tests/models/test_families.py 2>&1 | tail -n 25 | tee "$out/families_bf16_compiled.log" ;;
    load)     python benchmarks/load_time.py --workdir /tmp/kiln-load 2>&1 | tail -n 40 | tee "$out/load_time.log" ;;
    profile)  python benchmarks/load_time.py --workdir /tmp/kiln-load --profile > "$out/load_profile.log" 2>&1
              grep -E "cumtime|site-packages/torch/(export|_inductor)|kiln/|import" "$out/load_profile.log" | head -40
              tail -n 14 "$out/load_profile.log" ;;
    decode1b|decode8b)
              cfg=llama-3.2-1b; [ "$step" = decode8b ] && cfg=llama-3.1-8b
              ck=/tmp/kiln-bench/$cfg-ckpt; eng=/tmp/kiln-bench/$cfg-engine
              checkpoint "$cfg" "$ck"
              [ -d "$eng" ] || python -m kiln build "$ck" -o "$eng" --dtype bfloat16 --device cuda --max-batch-size 64 \
                  --max-seq-len 2048 --max-input-len 1024 --max-num-tokens 4096 2>&1 | tail -n 12 | tee "$out/build_$cfg.log"
              python benchmarks/decode_profile.py "$eng" --batch 1 2>&1 | tail -n 30 | tee "$out/decode_profile_$cfg.log" ;;
    variants1b) # the 1B decode step, built and run once per variant: VARIANTS="name:--build-flag,--build-flag2 ..."
              cfg=llama-3.2-1b; ck=/tmp/kiln-bench/$cfg-ckpt
              checkpoint "$cfg" "$ck"
              for variant in ${VARIANTS:-pdl:--pdl nopdl:--no-pdl}; do
                name=${variant%%:*}; vars=${variant#*:}; eng=/tmp/kiln-bench/$cfg-engine-$name
                variant_engine "$vars" "$eng"
                echo "--- variant $name ($vars)"
                python benchmarks/decode_profile.py "$eng" --batch 1 --no-graph-run --top ${TOP:-40} 2>&1 \
                    | grep -v Warning | tail -n 48 | tee "$out/decode_profile_$name.log"
              done ;;
    abbench1b) # kiln bench at batch 1, one engine per variant built and run on this machine: VARIANTS="name:--build-flag,... ..."
              cfg=llama-3.2-1b; ck=/tmp/kiln-bench/$cfg-ckpt
              checkpoint "$cfg" "$ck"
              for variant in ${VARIANTS:-pdl:--pdl nopdl:--no-pdl}; do
                name=${variant%%:*}; vars=${variant#*:}; eng=/tmp/kiln-bench/$cfg-engine-$name
                variant_engine "$vars" "$eng"
              done
              for round in 1 2; do
                for variant in ${VARIANTS:-pdl:--pdl nopdl:--no-pdl}; do
                  name=${variant%%:*}; eng=/tmp/kiln-bench/$cfg-engine-$name
                  python -m kiln bench "$eng" --batch-sizes 1 --input-len 128 --output-len 256 \
                      --output-dir "$out/ab_${name}_$round" 2>&1 | grep "ms/token" | sed "s/^/[$name round $round] /" | tee -a "$out/ab1b.log"
                done
              done ;;
    linsweep) python benchmarks/linear_kernels.py --models 1b --m 1 --sweep-one-row ${SWEEP_MODELS:-1b 8b} 2>&1 \
                  | tail -n 30 | tee "$out/linear_sweep.log" ;;
    bench1b|bench8b)
              cfg=llama-3.2-1b; [ "$step" = bench8b ] && cfg=llama-3.1-8b
              ck=/tmp/kiln-bench/$cfg-ckpt; eng=/tmp/kiln-bench/$cfg-engine
              checkpoint "$cfg" "$ck"
              b0=$(date +%s)
              [ -d "$eng" ] || python -m kiln build "$ck" -o "$eng" --dtype bfloat16 --device cuda --max-batch-size ${BENCH_MAX_BATCH:-64} \
                  --max-seq-len ${BENCH_MAX_SEQ:-2048} --max-input-len 1024 --max-num-tokens 8192 2>&1 | grep -v -i warn | tail -n 30 | tee "$out/build_$cfg.log"
              echo "build $cfg: $(( $(date +%s) - b0 )) s" | tee -a "$out/steps.txt"
              cp "$eng/manifest.json" "$out/manifest_$cfg.json"
              hf=(--compare-hf "$ck" --hf-systems "${BENCH_HF:-eager,static}"); [ "${BENCH_HF:-}" = none ] && hf=()
              python -m kiln bench "$eng" "${hf[@]}" --batch-sizes ${BENCH_BATCHES:-1,8,64} \
                  --input-len 128 --output-len 256 --output-dir "$out/bench_$cfg" ${BENCH_EXTRA:-} 2>&1 | tail -n 40 | tee "$out/bench_$cfg.log" ;;
    throughput8b|steps8b)
              cfg=llama-3.1-8b; ck=/tmp/kiln-bench/$cfg-ckpt; eng=/tmp/kiln-bench/$cfg-engine
              checkpoint "$cfg" "$ck"
              b0=$(date +%s)
              [ -d "$eng" ] || python -m kiln build "$ck" -o "$eng" --dtype bfloat16 --device cuda --max-batch-size 256 \
                  --max-seq-len 2048 --max-input-len 1024 --max-num-tokens ${TP_TOKENS:-8192} 2>&1 | tail -n 12 | tee "$out/build_tp.log"
              echo "build $cfg (batch 256): $(( $(date +%s) - b0 )) s" | tee -a "$out/steps.txt"
              if [ "$step" = steps8b ]; then  # one mixed and one decode step of the throughput run, profiled
                python benchmarks/step_profile.py "$eng" --json "$out/step_profile.json" ${STEP_ARGS:-} 2>&1 \
                    | grep -v -i warn | tail -n 60 | tee "$out/step_profile.log"
              else
              # TP_VARIANTS="name=[VAR=value ...] [bench options];name2=..." runs the bench once per variant
              IFS=';' read -ra tp_variants <<< "${TP_VARIANTS:-default=}"
              for variant in "${tp_variants[@]}"; do
                name=${variant%%=*}; envs=(); opts=()
                for word in ${variant#*=}; do
                  if [[ $word == --* || $word != *=* ]]; then opts+=("$word"); else envs+=("$word"); fi
                done
                echo "--- throughput variant $name: ${variant#*=}" | tee -a "$out/steps.txt"
                env "${envs[@]}" python -m kiln bench "$eng" --batch-sizes ${TP_BATCHES:-1} --output-len ${TP_OUT:-1000} \
                    --input-len ${TP_IN:-1000} --throughput --num-requests ${TP_N:-1000} --output-dir "$out/throughput_$name" \
                    "${opts[@]}" 2>&1 | grep -v -i warn | tail -n 30 | tee "$out/throughput_$name.log"
              done
              fi ;;
    vlm7b)    python benchmarks/vlm_speed.py --workdir /tmp/kiln-vlm --config llava-1.5-7b --device cuda \
                  --out "$out/vlm_speed.json" 2>&1 | grep -v Warning | tail -n 30 | tee "$out/vlm_speed.log" ;;
    vlmdecode) # VLM engines against text engines of the same LLM shape: VLM_DECODE_ARGS="--shapes qwen2.5-vl-3b --no-compile"
              python benchmarks/vlm_decode.py --workdir /tmp/kiln-vlm-decode --out "$out/vlm_decode.json" ${VLM_DECODE_ARGS:-} \
                  2>&1 | grep -v Warning | tail -n 20 | tee "$out/vlm_decode.log" ;;
    vlmfamilies) KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16 python -m pytest -q -p no:cacheprovider \
                  tests/models/test_vlm_families.py -k greedy 2>&1 | tail -n 15 | tee "$out/vlm_families_bf16.log" ;;
    kernels)  python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 5 | tee "$out/kernels.log" ;;
    cpu)      python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -n 15 | tee "$out/cpu_suite.log" ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
python - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("families_bf16.jsonl", "families_bf16_compiled.jsonl"):
    path = out / name
    if not path.exists():
        continue
    print(f"--- {name}: family, prompt length, identical tokens of 16, max logit diff, divergence margin")
    for line in path.read_text().splitlines():
        r = json.loads(line)
        print(f"{r['family']:10s} {r['prompt_len']:3d} {r['identical_tokens']:3d} {r['max_logit_diff']:.4f} {r.get('hf_margin', '')}")
PY
cat "$out/steps.txt"
