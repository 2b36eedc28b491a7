"""Safe to call from several Python threads at once: which numba threading layer runs fastbp's parallel code.

numba runs ``parallel=True`` code on one of three threading layers. Its default order is tbb, then omp
(OpenMP), then workqueue. tbb and omp (GNU libgomp included) are thread-safe: two Python threads may run
parallel code at the same time. workqueue is not: it ABORTS the whole process ("Concurrent access has been
detected") when two threads launch parallel work at once. It is used when neither tbb nor an OpenMP
runtime can be loaded, or when the user asks for it (``NUMBA_THREADING_LAYER=workqueue``).

fastbp never overrides the user's or numba's choice of layer. Before its first parallel call it makes numba
load its layer, reads which one it got, and, if that is workqueue, runs every one of its own compiled calls
under one process-wide lock: trainers in different threads then take turns instead of crashing the host.
With tbb or omp there is no lock and the threads run concurrently.
"""
from __future__ import annotations

import contextlib
import functools
import threading

_init_lock = threading.Lock()
# Held around fastbp's compiled calls when the layer is not thread-safe. Re-entrant: a guarded backend
# method may call another.
_call_lock = threading.RLock()
_NO_LOCK = contextlib.nullcontext()
_layer: str | None = None
_serialise = True  # until the layer is known, be safe


def threading_layer() -> str:
    """The numba threading layer fastbp's parallel code runs on (loading it if numba has not yet)."""
    global _layer, _serialise
    if _layer is None:
        with _init_lock:
            if _layer is None:
                import numba

                try:
                    from numba.np.ufunc import parallel

                    parallel._launch_threads()  # private, idempotent: loads the layer numba's config selects
                    layer = numba.threading_layer()
                except Exception:  # an API change or no layer loadable: unknown, so keep the lock
                    layer = "unknown"
                _serialise = layer not in ("tbb", "omp")
                _layer = layer
    return _layer


def parallel_call():
    """Context manager around one of fastbp's compiled calls: the lock under workqueue, nothing otherwise."""
    if _layer is None:
        threading_layer()
    return _call_lock if _serialise else _NO_LOCK


def serialised() -> bool:
    """True when fastbp runs its compiled calls one at a time (the layer is not thread-safe)."""
    threading_layer()
    return _serialise


def guarded(method):
    """Decorator for a backend method that runs compiled parallel code: see :func:`parallel_call`."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with parallel_call():
            return method(*args, **kwargs)

    return wrapper
