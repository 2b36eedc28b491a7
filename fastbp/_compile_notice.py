"""One line on stderr when a public call spends more than a second compiling fastbp's kernels.

A first fit on an empty kernel cache compiles for seconds (a 32-64-64-5 relu fit: about 12 s on
the project's 2-core AMD EPYC) with nothing else to show for it; issue 29 found new users waiting in
silence. numba announces every compilation it starts and ends as a "numba:compile" event (``numba.core.event``,
and ``numba.cuda.core.event`` for numba-cuda's kernels); a listener here times the compilations of fastbp's
own functions while a public call (:class:`Trainer` ``fit`` / ``predict`` / ``evaluate`` / ``loss_and_grads``)
is running. Once they add up to more than :data:`THRESHOLD_SECONDS` within one call, a timer thread prints one
line, while the compiler is still working, and never again in this process. A warm cache loads kernels
without compiling (numba sends no event for a cache hit), so a warm start prints nothing.

``FASTBP_QUIET_COMPILE=1`` turns the line off; :func:`compile_seconds` counts the seconds either way, so that
programs can say whether a timing includes compiling (``fastbp.compile_seconds()``).

The kernels themselves are not touched: this module only listens.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from numba.core import event

# Compiling for longer than this within one public call gets the line.
THRESHOLD_SECONDS = 1.0
QUIET_VARIABLE = "FASTBP_QUIET_COMPILE"


def _quiet() -> bool:
    return os.environ.get(QUIET_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def _is_fastbp(dispatcher) -> bool:
    module = getattr(getattr(dispatcher, "py_func", None), "__module__", None) or ""
    return module == "fastbp" or module.startswith("fastbp.")


class _Watch:
    """The state of the listener, shared by every thread (numba compiles one function at a time, under its
    global compiler lock, so compilations never overlap; public calls in several threads may)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0  # public calls in progress, in every thread
        self.what = None  # callable -> str: what the outermost call compiles for (for the message)
        self.depth = 0  # nesting of fastbp compilations (compiling a kernel compiles the kernels it calls)
        self.started = 0.0  # when the outermost compilation in progress started (perf_counter)
        self.target = "cpu"  # whose compilation is in progress: "cpu" (numba) or "cuda" (numba-cuda)
        self.call_seconds = 0.0  # compiling since the outermost public call began
        self.total_seconds = 0.0  # compiling in this process, over every public call
        self.announced = False
        self.timer = None
        self.registered = set()  # the event modules the listener is registered with


_watch = _Watch()


class _Timing:
    """Times fastbp's compilations while a public call runs; arms the timer that prints the line. Mixed into
    each event module's own Listener class (numba-cuda's event module has its own copy of numba's)."""

    def __init__(self, target: str):
        self.target = target

    def on_start(self, ev):
        if not _is_fastbp(ev.data.get("dispatcher")):
            return
        w = _watch
        with w.lock:
            w.depth += 1
            if w.depth > 1 or w.calls == 0:
                return
            w.started = time.perf_counter()
            w.target = self.target
            if not w.announced and not _quiet():
                w.timer = threading.Timer(max(0.0, THRESHOLD_SECONDS - w.call_seconds), _announce_if_still_compiling)
                w.timer.daemon = True
                w.timer.start()

    def on_end(self, ev):
        if not _is_fastbp(ev.data.get("dispatcher")):
            return
        w = _watch
        with w.lock:
            w.depth = max(0, w.depth - 1)
            if w.depth or w.calls == 0 or not w.started:
                return
            seconds = time.perf_counter() - w.started
            w.started = 0.0
            w.call_seconds += seconds
            w.total_seconds += seconds
            if w.timer is not None:
                w.timer.cancel()
                w.timer = None


def _announce_if_still_compiling() -> None:
    w = _watch
    with w.lock:
        w.timer = None
        if w.announced or not w.started or _quiet():
            return
        if w.call_seconds + time.perf_counter() - w.started < THRESHOLD_SECONDS:
            return
        w.announced = True
        what, target = w.what, w.target
    try:
        described = what() if what is not None else "this call"
    except Exception:  # noqa: BLE001 - a message must never break training
        described = "this call"
    sys.stderr.write(message(described, target) + "\n")
    sys.stderr.flush()


def message(described: str, target: str = "cpu") -> str:
    """The line: what is being compiled, that it happens once (per machine on the CPU), how to do it ahead."""
    if target == "cuda":
        return (f"fastbp: compiling CUDA kernels for {described}; numba-cuda keeps no disk cache, so each new "
                f"process compiles them once (later calls are fast). {QUIET_VARIABLE}=1 hides this line.")
    from . import _jit

    if not _jit.CACHE_ENABLED:
        return (f"fastbp: compiling CPU kernels for {described}; the kernel cache is off (FASTBP_CACHE=0), so "
                f"every new process compiles them again. {QUIET_VARIABLE}=1 hides this line.")
    return (f"fastbp: compiling CPU kernels for {described}; the first fit, predict and evaluate of each "
            "configuration compile once per machine (cached on disk), and `python -m fastbp precompile` compiles "
            f"them ahead of time. {QUIET_VARIABLE}=1 hides this line.")


def _register() -> None:
    """Register the listener with numba's event system, and with numba-cuda's once that is imported."""
    w = _watch
    for target, module in (("cpu", event), ("cuda", sys.modules.get("numba.cuda.core.event"))):
        if module is None or target in w.registered:
            continue
        w.registered.add(target)  # tried once: a failure must never break training, nor be retried per call
        try:
            listener = type("_Listener", (_Timing, module.Listener), {})(target)
            module.register("numba:compile", listener)
        except Exception:  # noqa: BLE001 - an event API that changed: no notice, training unaffected
            pass


class watching:
    """Context manager around a public call: fastbp's compilations inside it are timed, and the line is printed
    once they pass the threshold. Calls may nest (choose_learning_rate runs fit) and run in several threads.

    Parameters
    ----------
    what : callable returning str
        What the call compiles for, e.g. ``"Trainer.fit of a 1-16-1 sigmoid network (float32, mse, sgd)"``;
        called only if the line is printed.
    """

    __slots__ = ("what",)

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        w = _watch
        if len(w.registered) < 2 and ("cpu" not in w.registered or "numba.cuda.core.event" in sys.modules):
            _register()  # once for numba, once more if numba-cuda is imported later
        with w.lock:
            if w.calls == 0:
                w.call_seconds = 0.0
                w.what = self.what
            w.calls += 1
        return self

    def __exit__(self, *exc_info):
        w = _watch
        with w.lock:
            w.calls -= 1
            if w.calls == 0:
                w.what = None
                if w.timer is not None:
                    w.timer.cancel()
                    w.timer = None
        return False


def compile_seconds() -> float:
    """Seconds this process has spent compiling fastbp's kernels during fastbp's calls (0.0 when every kernel
    came from the disk cache). Take the difference around a call to tell whether its time includes compiling.

    >>> import fastbp
    >>> fastbp.compile_seconds() >= 0.0
    True
    """
    with _watch.lock:
        seconds = _watch.total_seconds
        if _watch.started and _watch.calls:
            seconds += time.perf_counter() - _watch.started
        return seconds
