# Sourced by .ci/run ($py, run_pytest, NUMBA_CACHE_DIR). The explicit-vector kernels (simd, gemm, narrow)
# choose their vector width from the CPU numba compiles for: the main test run covers this machine's (512-bit
# on an AVX-512 CPU); here they are compiled for an AVX2 CPU (NUMBA_CPU_NAME=haswell: 256-bit vectors, 8
# float32 lanes), so both widths run on every CI machine. Own cache: code for another CPU must not be loaded
# by the other runs.
run_pytest env NUMBA_CPU_NAME=haswell NUMBA_CACHE_DIR="$NUMBA_CACHE_DIR/haswell" \
  "$py" -m pytest -q -p no:cacheprovider -n auto tests/test_simd.py tests/test_gemm.py tests/test_narrow.py
