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

from numba import njit, types
from numba.extending import intrinsic

CACHE_ENABLED = os.environ.get("FASTBP_CACHE", "1").lower() not in ("0", "false", "no", "off")


def cpu_jit(parallel=False, cache=True, **options):
    """Decorator: ``numba.njit`` with fastbp's defaults, lazily compiled (no signature), cached when possible.

    ``parallel=True`` only on the functions that hold a ``prange`` loop. A cached serial function may call a
    parallel one since numba 0.63 (numba #8578, fixed by PR #9950; before it, loading such a caller from the
    cache segfaulted, and fastbp compiled every function parallel): hence ``numba>=0.63``. numba's parfor
    passes on a function with nothing to parallelise only cost compile time (19 of the fused narrow kernel's
    54 s cold compile, when it was compiled parallel). ``cache=False`` keeps a function off the disk cache
    (the product engine while FASTBP_SIMD_BITS overrides its vector width: see fastbp.kernels.simd).
    """
    def decorate(func):
        if cache and CACHE_ENABLED:
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


# Shared helpers that both targets compile: inlined into every caller (see shared toolchain notes: only
# inline helpers compile to PTX without a GPU), so they are never compiled or cached on their own.
inline = njit(inline="always")


# --- 512-bit vectors where fastbp asks for them --------------------------------------------------------------
# LLVM compiles for AVX-512 CPUs of the Skylake-server line (Skylake-X to Emerald Rapids) with the tuning flag
# prefer-256-bit: its vectorisers stop at 256-bit ymm registers even though zmm is available (the choice clang
# exposes as -mprefer-vector-width=; LLVM's X86.td lists TuningPrefer256Bit for those CPUs, a guard against
# the clock drop of 512-bit code on the early ones). For fastbp's product kernels, which are FMA-bound, that
# caps the peak: measured here (Emerald Rapids, float32, one thread, 512x1024x1024, medians of 5 alternating
# rounds) the 6x4 NT tile ran at 60 GFLOP/s with ymm and 76 with zmm, against OpenBLAS's 90; with 2-D
# parallel tasks the product on two threads went from about 110 to 145-190 GFLOP/s. A function attribute is the
# per-function form of that choice, so it changes fastbp's own kernels only, never the user's numba code
# (numba's process-wide alternative, NUMBA_CPU_FEATURES, would). On CPUs without AVX-512 the attribute asks for
# nothing the target has, and LLVM keeps its usual widths.
WIDE_VECTORS_ATTRIBUTE = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Call first thing in a CPU kernel: LLVM may vectorise that function with 512-bit registers.

    Only the function that makes the call gets the attribute (numba compiles each function into its own
    module, vectorised before linking), so call it in each kernel whose loops should use zmm registers.
    A no-op where llvmlite cannot carry the attribute (it keeps function attributes in a set of known names:
    the string attribute is added to the set directly)."""
    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, WIDE_VECTORS_ATTRIBUTE)
        except TypeError:  # a future llvmlite whose attributes are not a set: keep the default widths
            pass
        return context.get_dummy_value()

    return types.none(), codegen
