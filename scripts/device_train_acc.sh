#!/usr/bin/env bash
# Train the quantization-accuracy checkpoint (issue 17 item 6) on one GPU, in one call of the device tool:
#   bash scripts/device_train_acc.sh                          # ~6 min: corpus + tokenizer ~1 min, 4 min of training
#   ACC_DRY=1 OUT=/tmp/x bash scripts/device_train_acc.sh     # the same on CPU: tiny shape, stdlib only, 1 minute
# The corpus (pydoc topics + .py files of the standard library and some installed packages), its held-out
# and calibration text are made here by the same run as the checkpoint: they depend on the Python and the
# packages of the machine. Everything comes back as $OUT/acc-model.tgz.N (pieces under 15 MiB), its
# sha256, and train.log; `python scripts/unpack_acc_model.py DIR` unpacks into /work/acc-model-gpu/.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=true
py=${PYTHON:-python3}
out=${OUT:-device-out}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=$(mktemp -d); model=$work/acc-model
start=$(date +%s)

if [ -n "${ACC_DRY:-}" ]; then  # CPU, tiny: checks the whole path end to end
  packages=""
  shape=(--device cpu --threads 2 --vocab-size 1024 --hidden 128 --intermediate 256 --layers 2 --heads 2 --kv-heads 1
         --seq-len 512 --batch 4 --lr 3e-3 --warmup 25 --eval-every 250 --max-steps 100000
         --max-minutes "${ACC_MINUTES:-1}" --tokenizer-chars 2000000)
else
  # 29.4 M parameters, ~201 MFLOP a trained token: at ~120 TFLOP/s (30% of an H100) a 32,768-token step takes
  # ~55 ms, so 4 minutes give ~4,400 steps, ~144 M tokens, ~5 passes over the ~29 M training tokens; at most
  # 6,000 steps (~7 passes) on a faster card.
  packages=""
  for p in numpy scipy sympy torch networkx sklearn pandas matplotlib; do  # those installed join the corpus
    "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$p') is None)" && packages+="${packages:+,}$p"
  done
  shape=(--device cuda --threads 8 --vocab-size 8192 --hidden 512 --intermediate 1536 --layers 8 --heads 8 --kv-heads 4
         --seq-len 512 --batch 64 --lr 1.5e-3 --warmup 100 --eval-every 1000 --max-steps 6000
         --max-minutes "${ACC_MINUTES:-4}" --tokenizer-chars 30000000)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
echo "corpus packages: ${packages:-none}"

"$py" scripts/train_demo.py --corpus pysource --corpus-packages "$packages" "${shape[@]}" \
    --heldout-fraction 0.02 --heldout-chars 200000 --calib-chars 200000 --weight-decay 0.1 \
    --log-every 200 --save-dtype bfloat16 --max-shard-size 14MB \
    --out "$model/ckpt" --heldout-out "$model/heldout.txt" --calib-out "$model/calib.txt" 2>&1 \
    | grep -v -e "Token indices sequence length" -e "Writing model shards" | tee "$out/train.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "training failed ($rc)"; exit "$rc"; }

cp "$model/ckpt/training_info.json" "$model/training_info.json"; cp "$out/train.log" "$model/train.log"
tar -C "$work" -czf "$work/acc-model.tgz" acc-model
(cd "$work" && sha256sum acc-model.tgz) > "$out/acc-model.sha256"
split -b 14m -d -a 1 "$work/acc-model.tgz" "$out/acc-model.tgz."
rm -rf "$work"
ls -l "$out"

"$py" - "$out/train.log" <<'PY'
import json, re, sys
log = open(sys.argv[1]).read()
i = json.loads(re.findall(r"^(\{.*\})$", log, re.M)[-1])
print("| parameters | train tokens | steps | tokens seen | epochs | train s | held-out loss | unigram | bits/char |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
print(f"| {i['parameters']:,d} | {i['train_tokens']:,d} | {i['steps']:,d} | {i['tokens_seen']:,d} | {i['epochs']} | "
      f"{i['train_seconds']} | {i['heldout_loss']} | {i['heldout_unigram_loss']} | {i['heldout_bits_per_char']} |")
PY
echo "== took $(( $(date +%s) - start )) s"
