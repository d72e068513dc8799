#!/usr/bin/env bash
# The checks that need a GPU, as one short script (CI has none): the CUDA-marked tests, then
# the back-patching engine on a randomly initialised 7B-shaped Llama in bf16 (cells/s, peak
# memory, ratio to the naive reference). Writes its logs under $OUT (default /tmp/gpu-checks).
#   bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/card.txt"
python3 -c "import torch, transformers, transformer_lens as tl; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/card.txt"
python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
python3 scripts/bench_backpatch.py --random llama-7b --dtype bfloat16 --device cuda --cases 8 \
  --positions t1 --kinds back --layers every:4 2>&1 | tee "$OUT/bench_llama7b_bf16.txt"
