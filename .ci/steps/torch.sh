# Sourced by .ci/run ($root, $py, run_pytest): the tests that check fastbp against PyTorch, the independent
# reference for its optimizers (SGD, Adam, AdamW, gradient clipping), learning-rate schedules, sample weights
# and interop (torch state dicts, safetensors files), and the GPU session's PyTorch peer (in the simulator).
# They skip where torch is missing, as in the README's test command: torch is a dependency of neither fastbp nor
# its test extra (on Linux a plain `pip install torch` is a multi-gigabyte CUDA build), so until this step CI
# skipped all of them (found 2026-12-07: four whole test files and 70 interop tests).
# torch==2.13.0: the CPU build this machine kind installs from a local wheel (any other version downloads
# gigabytes). The kernels come from the cache that the README's test command filled.
"$root/.venv/bin/pip" install -q "torch==2.13.0" safetensors
run_pytest "$py" -m pytest -q -p no:cacheprovider -n auto tests/test_optimizers_torch.py tests/test_schedules.py \
  tests/test_sample_weight.py tests/test_interop.py
run_pytest env NUMBA_ENABLE_CUDASIM=1 "$py" -m pytest -q -p no:cacheprovider -n auto tests/cuda/test_device_tools.py
