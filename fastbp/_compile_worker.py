"""The helper process of a compile session (see fastbp._jit, "compile sessions"): compiles separately compiled
functions into numba's disk cache for the process that started it.

    python -m fastbp._compile_worker CLAIM_FOLDER PARENT_PID DTYPE module:attribute [module:attribute ...]

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


def main(argv) -> int:
    folder, parent, dtype_name, *names = argv
    from numba import types

    from ._jit import LAST_SUFFIX, claim, done_marker, exit_marker, queue_file

    dtype = getattr(types, dtype_name)
    pending, done, read = list(names), set(), 0

    def parent_gone() -> bool:
        # reparented (the parent has exited), or the parent has said it is exiting (fastbp._jit._forget_helpers)
        return os.getppid() != int(parent) or os.path.exists(exit_marker(folder))

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
