# The CUDA target on a machine without a GPU (sourced by .ci/run: $py, run_pytest, set -euo pipefail).
# Three processes, because the simulator is chosen when numba is imported and compile_ptx does not work in
# a simulator process: (1) every kernel and the CUDA backend's parity with the CPU kernels in numba's CUDA
# simulator (tests/cuda/test_trainer_cuda.py goes through the Trainer), (2) every kernel compiled to PTX for
# sm_90 and sm_75 in float32 and float64 (the type check the simulator cannot do; float64 in float32 code
# only in the epoch-loss accumulators), (3) the per-kernel resource report from ptxas and nvdisasm, which
# fails on spills and on product inner loops above 6 SASS instructions per FMA.
# The '.[test]' extra (installed by the README test command) brings numba-cuda and NVRTC; libNVVM and
# ptxas come from the system CUDA toolkit (or: pip install 'fastbp[ptx]' for libNVVM and nvdisasm as wheels).
run_pytest env NUMBA_ENABLE_CUDASIM=1 FASTBP_REQUIRE_CUDA=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0 \
  "$py" -m pytest -q -p no:cacheprovider -n auto tests/cuda
ptx_dir=$(mktemp -d)  # the check keeps each kernel's PTX; the report assembles those instead of compiling again
run_pytest env FASTBP_PTX_CHECK=1 FASTBP_PTX_DIR="$ptx_dir" \
  "$py" -m pytest -q -p no:cacheprovider -n auto tests/cuda/test_ptx.py
"$py" -m pip install -q 'nvidia-cuda-nvdisasm==13.*'
"$py" -m dev.cuda_report --arch sm_90 --require-sass --ptx-dir "$ptx_dir"
rm -rf "$ptx_dir"
