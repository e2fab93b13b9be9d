#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one call on a lent GPU machine (see the
# developers' guide: one prepared script, one call). The machine has python3 with torch,
# torchvision, safetensors, tqdm, matplotlib, tensorboard and scikit-image already.
# Usage there: bash bench/gpu.sh   (writes $OUT/gpu-*.json, and $OUT/BENCHMARKS.md: the repo's
# BENCHMARKS.md with the GPU sections added; copy it over the repo's to record them)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/alexnet-gpu-out}; mkdir -p "$OUT"
MD="$OUT/BENCHMARKS.md"; cp BENCHMARKS.md "$MD"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch; print("torch", torch.__version__)'; } | tee "$OUT/gpu-machine.txt"
# 1. correctness on the GPU: LRN kernels against the float64 formula, the model tests.
python3 -m pytest -q -x tests/test_lrn.py tests/test_model.py -k "not slow" 2>&1 | tail -3
# 2. training-step speed of every profile against torchvision (fp32, and the fastest modes).
timeout 300 python3 -m alexnet bench model --device cuda --json --compile --markdown "$MD" > "$OUT/gpu-bench-model.json"
# 3. the loader alone, 16 cores.
timeout 240 python3 -m alexnet bench data --json --workers "$(nproc)" --markdown "$MD" > "$OUT/gpu-bench-data.json"
# 4. end to end: prepared store + paper net bf16 against the reference-style loop, GPU busy %.
timeout 600 python3 bench/gpu_e2e.py --images 20000 --steps 200 --batch-size 256 --markdown "$MD" | tee "$OUT/gpu-e2e.txt"
sed -n '/bench model (cuda): begin/,$p' "$MD"
