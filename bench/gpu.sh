#!/usr/bin/env bash
# Every GPU figure of the project, in one run (< 8 min on one H100/H200):
#   1. erasure iteration time and peak memory, trainer (bf16) vs reference (fp32), SD1.4-size
#   2. sampling images/s, batched sampler vs batch-1 StableDiffusionPipeline, SD1.4-size, 512 px
# Starts from a machine with torch but without diffusers: wheels travel in bench/wheels
# (fill it here with `bench/gpu.sh --fetch-wheels`; the folder is git-ignored, carry it).
# Results: $OUT/gpu-*.json (or ./bench-out when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  pip download -q -d "$WHEELS" --python-version 3.11 --only-binary=:all: \
    diffusers==0.42.1 transformers==5.24.0 safetensors==0.8.0 accelerate==1.15.0 \
    pydantic==2.14.4 openai==3.57.0 tenacity==9.2.1 pandas==3.1.1 pyarrow==26.0.1 \
    tqdm==4.70.1 pyyaml==6.0.4 pillow==13.0.0 numpy==2.4.6
  exit 0
fi
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -c "import diffusers" 2>/dev/null || pip install -q --no-index --find-links "$WHEELS" \
  diffusers transformers safetensors accelerate pydantic openai tenacity pandas pyarrow tqdm pyyaml pillow
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-device.txt"
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu-device.txt"
timeout 300 python bench/train_step.py --model sd14 --device cuda --iterations 10 --ddim-steps 50 \
  --json "$OUT/gpu-train-step.json" 2>&1 | tee "$OUT/gpu-train-step.log" | grep '^{'
timeout 150 python bench/sample.py --model sd14 --device cuda --images 64 --batch-size 32 --steps 50 \
  --baseline-images 8 --rounds 2 --json "$OUT/gpu-sample.json" 2>&1 | tee "$OUT/gpu-sample.log" | grep '^{'
