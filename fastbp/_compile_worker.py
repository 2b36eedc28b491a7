"""The helper process of a compile session (see fastbp._jit, "compile sessions"): compiles separately compiled
functions into numba's disk cache for the process that started it.

    python -m fastbp._compile_worker CLAIM_FOLDER PARENT_PID DTYPE module:attribute [module:attribute ...]

Each function is compiled only if this process claims it first (the parent takes the ones left at the end).
Once the parent has exited (a script that ended after its first predict, say), this process compiles nothing
more (the rest of its list would only burn a core after the script's end) and removes the claim folder, which
the parent could not.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys


def main(argv) -> int:
    folder, parent, dtype_name, *names = argv
    from numba import types

    from ._jit import claim, done_marker

    dtype = getattr(types, dtype_name)
    try:
        for name in names:
            if os.getppid() != int(parent):
                break
            module_name, attribute = name.split(":")
            function = getattr(importlib.import_module(module_name), attribute)
            if claim(folder, function, dtype):
                function.fill(dtype)  # compiled and written to the disk cache
                open(done_marker(folder, function, dtype), "wb").close()
    finally:
        if os.getppid() != int(parent):
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
