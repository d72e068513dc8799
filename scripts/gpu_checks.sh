#!/usr/bin/env bash
# The checks that need a GPU, as one script for one ten-minute call (CI has none): the
# CUDA-marked tests (fast == naive on CUDA in fp32 on the trained toy, CUDA == CPU, ...), then
# the back-patching engine on a randomly initialised 7B-shaped Llama in bf16 (issue 28's GPU
# target: the full 32-layer grid, back + both controls at t1 and t2), 8 cases and then the
# target's 64 (cells/s, work efficiency, MFU against the bf16 matmul rate measured in the same
# process, peak memory; each workload's row is printed and saved as soon as it is measured, so
# a time limit keeps what finished), and, if time is left and git is there, the small workload
# measured before issue 28 (8 cases, back at t1, every 4th layer) beside the engine of that
# time. It stops itself before BUDGET seconds (default 570). Logs go under $OUT (default
# /tmp/gpu-checks).
#
# The lent machine's image has torch and transformers but not TransformerLens nor plotly, and
# reaches no package registry: fetch their wheels here first (scripts/gpu_wheels.sh, into
# .whl/), carry that folder, and this script installs them (into /tmp/site) before anything:
#   bash scripts/gpu_wheels.sh                                   # here
#   device run, carry [".whl"]: bash scripts/gpu_checks.sh       # there
set -uo pipefail
OUT=${OUT:-/tmp/gpu-checks}
WHEELS=${WHEELS:-.whl}
BUDGET=${BUDGET:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
left() { echo $((BUDGET - SECONDS)); }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl 2>&1 | grep -v "running pip as the 'root'" | tail -3
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH#$PWD}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/card.txt"
# everything the checks import, first: a missing package ends the call here, in seconds
if ! python3 -c "import torch, transformers, transformer_lens, plotly, latent_hops.analyses.backpatch
from importlib.metadata import version
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', \
transformers.__version__, 'transformer_lens', version('transformer-lens'))" 2>&1 \
  | tee -a "$OUT/card.txt"; then
  echo "missing packages: run scripts/gpu_wheels.sh here and carry .whl" | tee -a "$OUT/card.txt"
  python3 -m pip list 2>/dev/null > "$OUT/pip_list.txt"
  exit 1
fi

timeout 150 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/cuda_tests.txt"

BENCH="python3 scripts/bench_backpatch.py --random llama-7b --dtype bfloat16 --device cuda"
echo "== the GPU target: 8 then 64 cases ($(left) s left)"
timeout "$(left)" $BENCH --workload w8 cases=8 --workload w64 cases=64 \
  --csv "$OUT/bench_w64.csv" 2>&1 | tee "$OUT/bench_llama7b_w64.txt"

BASELINE=${BASELINE:-94a8045}  # the engine before issue 28 (needs git: the copy may have none)
if git rev-parse -q --verify "$BASELINE^{commit}" >/dev/null 2>&1 && [ "$(left)" -gt 120 ]; then
  echo "== the small workload beside $BASELINE ($(left) s left)"
  timeout "$(left)" $BENCH --workload small cases=8 layers=every:4 positions=t1 kinds=back \
    --baseline "$BASELINE" --csv "$OUT/bench_small.csv" 2>&1 | tee "$OUT/bench_llama7b_small.txt"
fi
echo "== done in $SECONDS s"
