"""The helper process of a compile session (see fastbp._jit, "compile sessions"): compiles separately compiled
functions into numba's disk cache for the process that started it.

    python -m fastbp._compile_worker CLAIM_FOLDER PARENT_PID DTYPE module:attribute [module:attribute ...]
    python -m fastbp._compile_worker CLAIM_FOLDER PARENT_PID --standby IDLE_SECONDS

With --standby (fastbp._standby: started by ``import fastbp`` on a cold cache) it imports fastbp's kernels and sets
up numba's compiler, then waits for its dtype and list in the claim folder's assignment file, and goes on as if
started with them; it stops instead once its parent has exited or let it go, or after IDLE_SECONDS untaken.

Each function is compiled only if this process claims it first (the parent takes the ones left at the end).
The functions the parent queues meanwhile (fastbp._jit.queue_file: a later trainer's needs) go before what is left
of its list, in their order, those queued as last (optional ones) after it; it stops once none are left.
Once the parent has exited or is exiting (a script that ended after its first predict, say: its exit writes a
marker into the claim folder, fastbp._jit.exit_marker), this process compiles nothing more (the rest of its list
would only burn a core after the script's end) and removes the claim folder, which the parent could not.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
import time

from . import _standby


# numba's CPU target imports its implementations before its first compile in a process; one of them asks whether
# scipy's BLAS is there (numba.np.arraymath: ``import scipy.linalg.cython_blas``, which imports all of scipy.linalg),
# to choose how np.dot and its kin compile. Where scipy is installed (scikit-learn's users), that import was 0.13 s
# of this process's first compile (0.28 -> 0.15 s for a trivial function, AMD EPYC Zen 4), on the critical path of
# a cold first predict, whose product engine this process compiles. fastbp's compiled functions call no BLAS
# (explicit loops, by design: tests/test_jit_cache.py checks their source), so numba compiles them to the same code
# without it: this process, which only ever compiles them, tells numba there is none. The user's process is left
# as it is (their own numba code may use np.dot).
NO_BLAS_MODULE = "scipy.linalg.cython_blas"


def main(argv) -> int:
    folder, parent, dtype_name, *names = argv
    sys.modules.setdefault(NO_BLAS_MODULE, None)  # an import of it raises ImportError: numba's "no BLAS"
    from numba import types

    from ._jit import LAST_SUFFIX, claim, done_marker, exit_marker, queue_file

    def parent_gone() -> bool:
        # reparented (the parent has exited), or the parent has said it is exiting (fastbp._jit._forget_helpers)
        return os.getppid() != int(parent) or os.path.exists(exit_marker(folder))

    if dtype_name == STANDBY:
        try:
            assignment = _stand_by(folder, parent_gone, float(names[0]))
        except BaseException:  # a failed import, say: the parent starts a helper of its own, nothing is left behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if assignment is None:
            shutil.rmtree(folder, ignore_errors=True)
            return 0
        dtype_name, *names = assignment
    dtype = getattr(types, dtype_name)
    pending, done, read = list(names), set(), 0
    try:
        while not parent_gone():
            queued = _queued(queue_file(folder))
            lines = queued[read:]
            read = len(queued)
            first = [name for name in dict.fromkeys(lines) if not name.endswith(LAST_SUFFIX) and name not in done]
            last = [name[:-len(LAST_SUFFIX)] for name in dict.fromkeys(lines) if name.endswith(LAST_SUFFIX)]
            pending = first + [name for name in pending if name not in first]
            pending += [name for name in last if name not in done and name not in pending]
            if not pending:
                break
            name = pending.pop(0)
            done.add(name)
            module_name, attribute = name.split(":")
            function = getattr(importlib.import_module(module_name), attribute)
            if claim(folder, function, dtype):
                function.fill(dtype)  # compiled and written to the disk cache
                open(done_marker(folder, function, dtype), "wb").close()
    finally:
        if parent_gone():
            shutil.rmtree(folder, ignore_errors=True)
    return 0


STANDBY = "--standby"


def _stand_by(folder, parent_gone, idle_seconds):
    """Get ready to compile, then wait for the parent's assignment: its lines (dtype, names), or None where the
    parent has gone or let this process go, or nobody took it within ``idle_seconds``."""
    from numba import njit

    import fastbp.kernels.cpu  # noqa: F401  the leaves' modules (cpu imports gemm)

    # numba sets up its CPU target (its typing and lowering registries) at a process's first compile: done now,
    # on a function of its own (not cached), while the parent is still importing
    njit("float64(float64)", cache=False)(_one_more)
    started = time.monotonic()
    path = os.path.join(folder, _standby.ASSIGNMENT)
    while True:
        if os.path.exists(path):
            with open(path) as assignment:
                return assignment.read().split("\n")[:-1]
        if parent_gone():
            return None
        if time.monotonic() - started > idle_seconds and _standby.claim_file(folder, _standby.TAKEN):
            return None  # expired: a parent that takes it later finds TAKEN and starts a helper of its own
        time.sleep(0.002 if time.monotonic() - started < 5 else 0.02)  # prompt while a first trainer is likely


def _one_more(x):
    return x + 1.0


def _queued(path) -> list:
    # the complete lines of the queue file (a line being written has no newline yet)
    try:
        with open(path) as queue:
            text = queue.read()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
