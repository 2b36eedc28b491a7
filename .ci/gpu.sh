#!/usr/bin/env bash
# On a machine WITH an NVIDIA GPU, fresh or not: one call, under 8 minutes, measures everything a GPU session
# is for and writes it as JSON and markdown (dev.gpu_session: versions, host cost per launch and per
# graph replay, every product kernel against torch.mm at the W3/W4 shapes, W1-W4 per epoch for fastbp CUDA,
# PyTorch CUDA and fastbp CPU, kernels per step from torch.profiler, the CUDA tests on the hardware).
#   bash .ci/gpu.sh [OUT_DIR]      # default: $OUT, else $TMPDIR/fastbp-gpu-session
# FASTBP_GPU_QUICK=1 shrinks W2-W4; PYTHON=... uses that interpreter as it is (no virtual environment);
# FASTBP_GPU_SKIP_INSTALL=1 installs nothing (a prepared machine).
# The machine may have no internet: every install step is bounded and fails fast, and whatever cannot run
# (no torch, no numba-cuda, numpy 2.5...) is skipped by the session with the reason in its report.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
budget=${FASTBP_GPU_BUDGET:-470}  # seconds for the whole script (8 minutes, with a margin)
out="${1:-${OUT:-${TMPDIR:-/tmp}/fastbp-gpu-session}}"
mkdir -p "$out"
log="$out/gpu-sh.log"
say() { printf '[gpu.sh %3ds] %s\n' "$(( $(date +%s) - started ))" "$*" | tee -a "$log" >&2; }
left() { echo $(( budget - ($(date +%s) - started) )); }

# A virtual environment that sees the image's own packages (its torch, its CUDA wheels): nothing is
# downloaded that the image already has.
venv="${FASTBP_GPU_VENV:-${TMPDIR:-/tmp}/fastbp-gpu-venv}"
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x "$venv/bin/python" ] || timeout 60 python3 -m venv --system-site-packages "$venv" >>"$log" 2>&1; then
  py=$venv/bin/python
else
  py=python3
  say "no virtual environment (python3 -m venv failed): using $(command -v python3)"
fi
pip_install() {  # bounded, no retries: a machine without an index fails in seconds, not minutes
  timeout "$1" "$py" -m pip install -q --disable-pip-version-check --retries 0 --timeout 15 "${@:2}" >>"$log" 2>&1
}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever pip manages
if [ "${FASTBP_GPU_SKIP_INSTALL:-0}" = "1" ]; then
  say "FASTBP_GPU_SKIP_INSTALL=1: using $py as it is"
else
  say "installing fastbp with its cuda and test extras (from this repository's pyproject.toml)"
  # Without an index, build isolation cannot fetch setuptools: retry with the image's own.
  pip_install 150 -e '.[cuda,test]' || pip_install 120 --no-build-isolation -e '.[cuda,test]' ||
    say "pip install -e '.[cuda,test]' failed (no index?): using what is installed"
fi
if [ "${FASTBP_GPU_SKIP_INSTALL:-0}" != "1" ] && ! "$py" -c "import torch" >/dev/null 2>&1; then
  say "torch is not installed: trying pip (for the PyTorch CUDA peer)"
  pip_install 120 torch || say "no torch: the PyTorch CUDA peer and torch.profiler counts will be skipped"
fi
"$py" -c "import numpy, sys; v = tuple(int(p) for p in numpy.__version__.split('.')[:2]); \
sys.exit(0 if v < (2, 5) else 1)" || say "numpy >= 2.5: numba-cuda 0.30 cannot compile; the session reports it"

export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$(mktemp -d)/numba-cache}"
unset NUMBA_ENABLE_CUDASIM
quick=()
[ "${FASTBP_GPU_QUICK:-0}" = "1" ] && quick=(--quick)
remaining=$(( $(left) - 10 ))
say "measuring (budget ${remaining} s) into $out"
timeout $(( remaining + 5 )) "$py" -m dev.gpu_session --out "$out" --budget "$remaining" "${quick[@]}" \
  2>>"$log"
rc=$?
say "done (rc $rc): $out/session.md, $out/session.json"
[ -f "$out/session.md" ] && cat "$out/session.md"
exit $rc
