"""The helper process of a compile session (see fastbp._jit, "compile sessions"): compiles separately compiled
functions into numba's disk cache for the process that started it.

    python -m fastbp._compile_worker CLAIM_FOLDER DTYPE module:attribute [module:attribute ...]

Each function is compiled only if this process claims it first (the parent takes the ones left at the end).
"""
from __future__ import annotations

import importlib
import sys


def main(argv) -> int:
    folder, dtype_name, *names = argv
    from numba import types

    from ._jit import claim

    dtype = getattr(types, dtype_name)
    for name in names:
        module_name, attribute = name.split(":")
        function = getattr(importlib.import_module(module_name), attribute)
        if claim(folder, function, dtype):
            function.fill(dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
