"""Development tools, run from a clone (``python -m dev.NAME`` in the repository's root), not installed with
fastbp: ``side_by_side`` (warm timings of checkouts, side by side), ``bench_products`` (the product engine against
OpenBLAS), ``bench_narrow`` (the fused narrow kernel on W1), ``compare_devices`` (CPU vs CUDA timings) and
``gpu_session`` (everything a GPU session measures, run by .ci/gpu.sh)."""
