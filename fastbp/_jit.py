"""The one place that decides how CPU kernels are compiled (caching, threading).

numba's ``cache=True`` writes compiled code beside the module, falls back to ``~/.cache/numba`` and honours
``NUMBA_CACHE_DIR``; when nothing is writable it raises at decoration time ("no locator available"), which
would make ``import fastbp`` fail on a read-only install. We try caching and fall back to none.
Set ``FASTBP_CACHE=0`` to turn caching off (numba caches can go stale across edits of inlined helpers in
other files, numba #10776).
"""
from __future__ import annotations

import os
import warnings

from numba import njit
from numba.core.errors import NumbaPerformanceWarning

CACHE_ENABLED = os.environ.get("FASTBP_CACHE", "1").lower() not in ("0", "false", "no", "off")


def cpu_jit(**options):
    """Decorator: ``numba.njit`` with fastbp's defaults, lazily compiled (no signature), cached when possible.

    Every function is compiled with ``parallel=True``, even those without ``prange``: a cached function that
    is NOT parallel and calls one that is segfaults when it is loaded from the cache (numba #8578, open;
    marking the caller parallel avoids it, numba #4807). Only ``prange`` loops and whole-array statements
    run in parallel; plain ``range`` loops stay serial, so the reference kernels stay serial.
    """
    parallel = True

    def decorate(func):
        if CACHE_ENABLED:
            try:
                return njit(cache=True, parallel=parallel, **options)(func)
            except RuntimeError as error:  # "cannot cache function ...: no locator available"
                warnings.warn(
                    f"fastbp: numba cannot cache {func.__qualname__} ({error}); compiling without a disk cache. "
                    "Set NUMBA_CACHE_DIR to a writable folder to keep compiled kernels between runs.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return njit(cache=False, parallel=parallel, **options)(func)

    return decorate


# parallel=True on a function without prange (see cpu_jit) makes numba warn that nothing was parallelised.
# That is expected for fastbp's kernels. numba raises it from different places (its own typed_passes module,
# or attributed to the kernel's file), so the filter keys on the message, which names the function's file:
# only warnings about fastbp's kernel files are hidden, a user's own numba code keeps its warnings.
def hide_expected_parallel_warnings() -> None:
    warnings.filterwarnings(
        "ignore", category=NumbaPerformanceWarning,
        message=r"(?s).*'parallel=True' was specified but no transformation.*fastbp[/\\]kernels[/\\]")


hide_expected_parallel_warnings()

# Shared helpers that both targets compile: inlined into every caller (see shared toolchain notes: only
# inline helpers compile to PTX without a GPU), so they are never compiled or cached on their own.
inline = njit(inline="always")
