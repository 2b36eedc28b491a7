#!/usr/bin/env bash
# On a machine WITH an NVIDIA GPU (one command, a few minutes): run the CUDA test suite on the hardware,
# then time CPU vs CUDA on the standard workloads and print a table.
#   bash .ci/gpu.sh            # uses ./.venv if present, else $PYTHON or python3; pass --quick to shrink W3/W4
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$(mktemp -d)/numba-cache}"
unset NUMBA_ENABLE_CUDASIM
"$py" -c "from fastbp.backends import cuda_unavailable_reason as r; import sys; m = r(); print('GPU:', m or 'usable'); sys.exit(1 if m else 0)"
echo "== CUDA test suite on the GPU =="
FASTBP_REQUIRE_CUDA=1 "$py" -m pytest -q -p no:cacheprovider tests/cuda
echo "== CPU vs CUDA =="
timeout 240 "$py" -m fastbp.tools.compare_devices "$@"
