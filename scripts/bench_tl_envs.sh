#!/usr/bin/env bash
# The fast back-patching engine on the hooked backend (.venv, TransformerLens 3.9) and on the
# bridge (.venv-tl4, TransformerLens 4.3), alternating, on the same toy cells, one thread each.
# Run on a quiet machine: `bash scripts/bench_tl_envs.sh [ROUNDS] [extra bench_backpatch args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
shift || true
for _ in $(seq "$rounds"); do
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_backpatch.py --backend hooked --threads 1 \
    --no-naive --repeats 3 "$@" 2>/dev/null | tail -1
  OMP_NUM_THREADS=1 .venv-tl4/bin/python scripts/bench_backpatch.py --backend bridge --threads 1 \
    --no-naive --repeats 3 "$@" 2>/dev/null | tail -1
done
