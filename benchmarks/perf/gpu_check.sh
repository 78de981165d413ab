#!/usr/bin/env bash
# The GPU check, sized for one device call (about 10 minutes on an H100/H200): 7B-shaped random
# weights in bf16, this stack vs transformers' generate (default and static cache) at batch 1 and 4,
# the memory-bandwidth roofline, and one 512x512 image with 3-way CFG + VQGAN decoding.
# Run from the repository root on the device machine, e.g. with the device tool:
#   bash benchmarks/perf/gpu_check.sh
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 benchmarks/perf/decode.py --preset 7B --device cuda --dtypes bf16 --batches 1,4 --new-tokens 128 \
    --image --json "$OUT/decode_7b.json" 2>&1 | tee "$OUT/decode_7b.log"
