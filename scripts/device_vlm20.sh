#!/usr/bin/env bash
# Issue 20's GPU checks in one call of the device machine (torch 2.11, transformers 5.17):
#   bash scripts/device_vlm20.sh [bf16|cuda32|bench|bench-tiny ...]   (default: bf16 bench)
#   bf16       Pix2Struct, Mllama and Phi-4-multimodal on cuda in bf16 against transformers (the families'
#              near-tie bar), and Fuyu / Kosmos-2 (tests/models/test_vlm_families.py, the same bar); then kiln's
#              Phi-4-multimodal image processor against transformers' (which needs torchvision, present there)
#   cuda32     the encoder-decoder family tests (T5, BART, mBART, BLIP-2 + Flan-T5, Nougat/Donut) built on cuda
#              in float32 against transformers on the CPU: tokens identical
#   bench      benchmarks/vlm20_speed.py: Nougat-base, BLIP-2-Flan-T5-XL, Fuyu-8B (VLM20_MODELS to choose)
#   bench-tiny the benchmark's tiny stand-ins (a quick check of the script on the GPU)
# Results land in $OUT (or ./device-out): logs, the benchmark's JSON, and a short table at the end.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-device-out}; mkdir -p "$out"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(bf16 bench)
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
torch.cuda.get_device_name())" | tee "$out/env.txt"
for step in "${steps[@]}"; do
  start=$(date +%s)
  case $step in
    bf16)     KILN_TEST_DEVICE=cuda KILN_TEST_DTYPE=bfloat16 python -m pytest -q -p no:cacheprovider \
                  tests/models/test_mllama.py tests/models/test_encdec_vlm.py tests/models/test_vlm_families.py \
                  tests/models/test_vlm_phi4mm.py -k "mllama or pix2struct or fuyu or kosmos2 or phi4mm" 2>&1 \
                  | tail -n 15 | tee "$out/vlm20_bf16.log"
              python -m pytest -q -p no:cacheprovider tests/unit/test_phi4mm_images.py -rs 2>&1 | tail -n 6 \
                  | tee "$out/phi4mm_processor.log" ;;
    cuda32)   python -m pytest -q -p no:cacheprovider tests/models/test_encdec_families.py tests/models/test_encdec_vlm.py \
                  -k "not pix2struct" 2>&1 | tail -n 15 | tee "$out/encdec_cuda_fp32.log" ;;
    bench)    python benchmarks/vlm20_speed.py --workdir /tmp/kiln-vlm20 --device cuda --out "$out/vlm20_speed.json" \
                  --models ${VLM20_MODELS:-nougat-base blip2-flan-t5-xl fuyu-8b} 2>&1 | grep -v -i warn | tail -n 14 \
                  | tee "$out/vlm20_speed.log" ;;
    bench-tiny) python benchmarks/vlm20_speed.py --workdir /tmp/kiln-vlm20-tiny --device cuda --new-tokens 32 \
                  --models nougat-tiny blip2-t5-tiny fuyu-tiny --out "$out/vlm20_speed_tiny.json" 2>&1 \
                  | grep -v -i warn | tail -n 10 | tee "$out/vlm20_speed_tiny.log" ;;
    *)        echo "unknown step $step (bf16, cuda32, bench, bench-tiny)"; exit 2 ;;
  esac
  echo "== $step took $(( $(date +%s) - start )) s" | tee -a "$out/steps.txt"
done
echo "--- summary"
for log in vlm20_bf16 phi4mm_processor encdec_cuda_fp32; do
  [ -f "$out/$log.log" ] && echo "$log: $(grep -E 'passed|failed' "$out/$log.log" | tail -n 1)"
done
for log in vlm20_speed vlm20_speed_tiny; do
  [ -f "$out/$log.log" ] && grep -A 8 "^model " "$out/$log.log"
done
cat "$out/steps.txt"
