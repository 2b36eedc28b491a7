"""Command-line tools: ``python -m fastbp.tools.compare_devices`` (CPU vs CUDA timings)."""
