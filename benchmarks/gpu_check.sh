#!/usr/bin/env bash
# The GPU checks of the inference engine, as one device call (about 5 minutes on an H100/H200; --quick: ~2):
#   1. the CUDA tests of the static decoders: the one-shot graph decoder (replayed graph == eager static step ==
#      dynamic cache) and the server's default path, continuous batching on a static slab replayed as a CUDA
#      graph (rows joining and leaving mid-decode == their solo runs);
#   2. benchmarks/serving.py --preset gpu (~1B Llama-shaped, bf16, 32 rows x (128 + 128) tokens), every
#      figure side by side with its baselines (engine base, HF generate, PEFT), the open batch (server path),
#      and the bandwidth and GEMM bounds. --quick skips the PEFT baselines and times 2 rounds.
# Results land in $OUT (the device tool's output folder) or benchmarks/results.
# Run from the repository root: bash benchmarks/gpu_check.sh [--quick]
set -euo pipefail
out="${OUT:-benchmarks/results}"
extra=()
tests=(tests/inference/test_static_decode.py tests/inference/test_slab_rows.py)
select=()
if [[ "${1:-}" == "--quick" ]]; then
  extra=(--skip-peft --repeats 2)
  select=(-k cuda)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if python -c "import pytest, hypothesis" 2>/dev/null; then
  python -m pytest -p no:cacheprovider -o addopts= -q -rs -W ignore::DeprecationWarning "${select[@]}" "${tests[@]}" 2>&1 | tail -15 | tee "$out/gpu-tests.txt"
else
  echo "pytest/hypothesis missing on this machine: carry their wheels to run the GPU tests" | tee "$out/gpu-tests.txt"
fi
python benchmarks/serving.py --preset gpu --out "$out" "${extra[@]}"
