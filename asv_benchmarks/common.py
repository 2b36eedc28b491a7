"""Shared pieces of fastbp's asv suite: the device parameter, seeded data, workload builders.

Every benchmark class takes the device ("cpu" or "cuda") as its FIRST parameter; CUDA cases raise
NotImplementedError in setup (asv's "skip") when no GPU is usable or under the CUDA simulator, whose
timings mean nothing. JIT compilation happens in setup (a warm-up call), never inside a timing.
"""
import importlib
import os

import numpy as np

DEVICES = ["cpu", "cuda"]

# W3 and W4 are timed on fewer samples than the workload defines (60000 and 16384), so that
# `asv run --quick` stays within seconds; the time per sample is what track_samples_per_second reports.
# python -m fastbp bench and examples/compare_peers.py time the full sizes.
REDUCED_SAMPLES = {"W1": None, "W2": None, "W3": 3840, "W4": 1024}


def require(device):
    """Raise NotImplementedError (asv: skip this case) unless ``device`` can run here."""
    if device == "cpu":
        return
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        raise NotImplementedError("CUDA simulator: timings mean nothing")
    from fastbp.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        raise NotImplementedError(reason)


def kernels(device):
    """The kernel module of a device (fastbp.kernels.cpu or fastbp.kernels.cuda)."""
    return importlib.import_module("fastbp.kernels." + device)


def to_device(device, *arrays):
    if device == "cpu":
        return arrays
    from numba import cuda

    return tuple(cuda.to_device(a) for a in arrays)


def synchronize(device):
    if device == "cuda":
        from numba import cuda

        cuda.synchronize()


def rng():
    return np.random.default_rng(12345)
