#!/usr/bin/env bash
# The Python packages that scripts/gpu_checks.sh needs and the lent GPU machine's image lacks
# (its python3 3.12 holds torch, transformers, numpy, pandas, pyarrow, scipy, einops, jaxtyping,
# tqdm and rich, but not TransformerLens nor plotly, and it reaches no package registry), as
# wheels in .whl/ (ignored by git). Run it here, where pip reaches PyPI, then carry the folder:
#   bash scripts/gpu_wheels.sh                      # ~15 MB into .whl/
#   device run, carry [".whl"]: bash scripts/gpu_checks.sh
# gpu_checks.sh installs them (no dependencies resolved: the image's own are used) first.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# TransformerLens 3.9 and what importing it (or latent_hops) needs beyond the image. The
# versions are those the project's own environment tests with (make setup).
PACKAGES=(
  transformer-lens==3.9.0 better-abc==0.0.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  beartype==0.23.1 typeguard==4.6.1 fancy-einsum==0.0.3 plotly==7.1.0
)
rm -rf "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
ls "$DEST"
