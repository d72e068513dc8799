#!/usr/bin/env bash
# The checks that need a GPU, as one script for one ten-minute call (CI has none): the
# CUDA-marked tests (fast == naive on CUDA in fp32 on the trained toy, CUDA == CPU, ...), then
# the back-patching engine on a randomly initialised 7B-shaped Llama in bf16 (issue 28's GPU
# target: the full 32-layer grid, back + both controls at t1 and t2): first the workload measured
# before (8 cases, back at t1, every 4th layer) with the engine of the commit before issue 28
# side by side, then the target, 64 cases (cells/s, work
# efficiency, MFU against the bf16 matmul rate measured in the same process, peak memory).
# Writes its logs under $OUT (default /tmp/gpu-checks).
#   bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/card.txt"
python3 -c "import torch, transformers, transformer_lens as tl; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/card.txt"
timeout 150 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/cuda_tests.txt"
BENCH="python3 scripts/bench_backpatch.py --random llama-7b --dtype bfloat16 --device cuda"
BASELINE=${BASELINE:-94a8045}  # the engine before issue 28 (needs git; skipped without it)
if git rev-parse -q --verify "$BASELINE^{commit}" >/dev/null 2>&1; then
  timeout 200 $BENCH --workload small cases=8 layers=every:4 positions=t1 kinds=back \
    --baseline "$BASELINE" --csv "$OUT/bench_small.csv" 2>&1 | tee "$OUT/bench_llama7b_small.txt"
fi
timeout 330 $BENCH --workload w64 cases=64 --csv "$OUT/bench_w64.csv" 2>&1 \
  | tee "$OUT/bench_llama7b_w64.txt"
