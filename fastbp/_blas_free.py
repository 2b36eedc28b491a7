"""Host arithmetic between compiled calls that never wakes the BLAS library's threads.

numpy hands ``np.dot`` of two float64 vectors longer than 10000 elements to OpenBLAS, which runs it on its own
thread pool; those threads then spin for about 50 ms waiting for more work (measured 2026-12-07: 50-70 ms of
CPU after one 12800-element dot, none after a 9000-element one; AMD EPYC Zen 4, 2 vCPUs). Between two of
fastbp's compiled calls that spinning thread holds a core that numba's parallel regions are waiting for: a
scikit-learn estimator's per-epoch ``np.dot`` over the weights made every epoch of a 100-128-5 fit 5x slower
(issue 27). Sums of products here go through ``np.einsum``, whose loops are numpy's own (no BLAS, no threads,
no temporary array: the inputs are cast to float64 in small buffers).
"""
from __future__ import annotations

import numpy as np


def sum_of_products(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` over two arrays of the same shape, accumulated in float64, on the calling thread only."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


def sum_of_squares(arrays) -> float:
    """``sum(x * x)`` over every element of every array in ``arrays``, in float64, on the calling thread only."""
    return sum(sum_of_products(x, x) for x in arrays)
