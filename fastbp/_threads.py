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

Which layer, on a busy machine: fastbp's products run as short parallel regions (a 784-256-256-10 training step
opens about six, of 0.1-0.3 ms each). When another process keeps one of two cores busy, an OpenMP thread that has
finished its share spins at the region's end while the thread it waits for is descheduled: that network's epoch
took 3.5-4.2x its idle time. TBB's workers sleep soon after they run out of work, and the calling thread takes
back any task that no worker has started: 1.55-1.62x, with the idle speed level (W1-W4 0.97-1.01x) and a
450-row predict and a 64-128-10 epoch at 1.0-1.2x (AMD EPYC Zen 4, 2 vCPUs, 2026-12-06; idle and busy rounds
alternate in one process: ``python -m dev.busy_machine``). numba prefers tbb to omp by default, but cannot find
the libtbb that ``pip install tbb`` puts in ``<prefix>/lib`` (numba #6108, #7148). fastbp depends on tbb on Linux
x86-64 and loads that library before numba picks its layer (:func:`make_tbb_findable`), unless the user named a
layer that excludes it (``NUMBA_THREADING_LAYER=omp``, say). TBB is also fork-safe where GNU OpenMP is not: a
process forked after an OpenMP parallel region (Python's multiprocessing on Linux) is terminated by numba in its
first parallel call.

How many threads: ``Trainer(n_threads=n)`` runs each of that trainer's compiled calls with
``numba.set_num_threads(n)`` and puts the caller's count back afterwards, also when the call raises. numba keeps
that count per Python thread, so this changes nothing for other threads, and code that runs between the
compiled calls (fit's callbacks, say) sees the caller's own setting. ``n_threads=None`` (the default) uses up to
numba's count, minus the cores that other processes keep busy (:class:`CoreShare`): with one of two cores taken
by a spinning process, the 784-256-256-10 epoch took 1.63x its idle time on two threads (the second thread's
share of each region waits for a core) and 1.45x on one (AMD EPYC Zen 4, 2 vCPUs, 2026-12-07: 78 ms idle on two
threads, 130 ms busy on two, 114 ms busy on one). Results do not depend on the thread count, so the choice only
changes the speed.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time

from ._validation import check_int

# numba.config.THREADING_LAYER values under which numba may pick tbb (numba's documentation: "Selecting a
# threading layer for safe parallel execution"): "safe" and "forksafe" are the fork-safe ones, which need it.
_LAYERS_THAT_MAY_BE_TBB = ("default", "tbb", "safe", "threadsafe", "forksafe")
_TBB_LIBRARY = "libtbb.so.12"  # the soname numba's tbbpool links to (TBB 2021 and later)


def make_tbb_findable() -> str | None:
    """Load the libtbb that pip installed into ``<prefix>/lib`` (or the user scheme's lib), so that numba finds it
    when it picks a threading layer; the path loaded, or None where there is nothing to do. Call it before any
    parallel numba code runs: once numba has loaded a layer, this changes nothing. Loading a library starts no
    thread; numba still decides the layer."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import os

    configured = os.environ.get("NUMBA_THREADING_LAYER", "default").strip().lower() or "default"
    if configured not in _LAYERS_THAT_MAY_BE_TBB:
        return None
    import ctypes
    import site

    try:  # a libtbb already in the process (loaded by another library): numba uses that one, never a second copy
        ctypes.CDLL(_TBB_LIBRARY, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        return None
    except OSError:
        pass
    for prefix in (sys.prefix, site.getuserbase()):
        path = os.path.join(prefix, "lib", _TBB_LIBRARY)
        if os.path.exists(path):
            try:
                # RTLD_GLOBAL: numba's ctypes.CDLL("libtbb.so.12") and tbbpool's DT_NEEDED then resolve to it
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                return None
            return path
    return None


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


def check_n_threads(name: str, value) -> int | None:
    """None, or an integer from 1 to ``numba.config.NUMBA_NUM_THREADS`` (numba cannot use more)."""
    value = check_int(name, value, minimum=1, allow_none=True)
    if value is not None:
        import numba

        limit = int(numba.config.NUMBA_NUM_THREADS)
        if value > limit:
            raise ValueError(f"{name} must be <= numba.config.NUMBA_NUM_THREADS ({limit}: the most threads numba "
                             f"starts in this process; set the NUMBA_NUM_THREADS environment variable before "
                             f"numba is imported to raise it); got {value}")
    return value


def parallel_call(n_threads: int | None = None):
    """Context manager around one of fastbp's compiled calls: the lock under workqueue, nothing otherwise;
    with ``n_threads``, the call also runs on that many threads (see the module docstring)."""
    if _layer is None:
        threading_layer()
    lock = _call_lock if _serialise else _NO_LOCK
    return lock if n_threads is None else _on_threads(lock, n_threads)


@contextlib.contextmanager
def _on_threads(lock, n_threads: int):
    import numba

    with lock:
        previous = numba.get_num_threads()
        if previous == n_threads:
            yield
            return
        numba.set_num_threads(n_threads)
        try:
            yield
        finally:
            numba.set_num_threads(previous)


def serialised() -> bool:
    """True when fastbp runs its compiled calls one at a time (the layer is not thread-safe)."""
    threading_layer()
    return _serialise


class CoreShare:
    """How many of this process's CPUs other processes keep busy, measured between fastbp's calls (Linux).

    A sample is the busy time of the CPUs in the affinity mask (``/proc/stat``: all but idle and iowait, steal
    included; niced processes' time only when this process is niced too: a process at a lower priority yields
    its core to this one's threads, and leaving that core out cost the 784-256-256-10 epoch 1.1x against a
    ``nice -n 19`` spinner, 103 -> 114 ms) and this process's CPU time (all its threads). Over the interval
    between two samples, the busy time that is not this process's is the other processes' load, in cores.
    Samples are at least ``interval`` seconds apart (a call within it reuses the last estimate): reading the CPU
    lines costs tens of microseconds, and the kernel counts in 10 ms ticks. GNU OpenMP's dynamic thread count
    (``OMP_DYNAMIC``) subtracts the 15-minute load average from the online processors instead
    (gomp_dynamic_max_threads, libgomp/config/posix/proc.c): too slow to follow a job that starts or ends during
    a fit, and blind to which CPUs are busy.
    """

    def __init__(self, interval: float = 0.05, stat_path: str = "/proc/stat"):
        self.interval = interval
        self.stat_path = stat_path
        self._lock = threading.Lock()
        self._last = None  # (wall, process CPU seconds, busy seconds of the CPUs) of the last sample
        self._others = 0.0  # the last estimate, in cores
        self._free = 1 << 30  # this process's CPUs minus self._others, rounded, at least 1

    def _busy_seconds(self, cpus) -> float | None:
        import os

        busy = 0
        try:
            count_nice = os.getpriority(os.PRIO_PROCESS, 0) > 0
            with open(self.stat_path) as stat:
                for line in stat:  # the per-CPU lines come first; stop before the long interrupt counts
                    if not line.startswith("cpu"):
                        break
                    name, *fields = line.split()
                    if name != "cpu" and int(name[3:]) in cpus:
                        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                        busy += user + system + irq + softirq + steal + (nice if count_nice else 0)
        except (OSError, ValueError, AttributeError):
            return None
        return busy / os.sysconf("SC_CLK_TCK")

    def others(self) -> float:
        """Cores busy with other processes' work (on this process's CPUs) over the interval that ended with the
        last sample, taking a new sample if the last is ``interval`` old: 0.0 where it cannot be measured."""
        with self._lock:
            self._sample()
            return self._others

    def _sample(self) -> None:
        # A new sample unless the last is less than ``interval`` old (called with the lock held: two threads that
        # found the estimate stale at once take one sample, not a second one microseconds later).
        import os

        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            cpus = None
        busy = None if cpus is None else self._busy_seconds(cpus)
        if busy is None:
            self._last = (now, None, None)
            self._others, self._free = 0.0, 1 << 30  # not measurable: no limit
            return
        sample = (now, time.process_time(), busy)
        if self._last is not None and self._last[2] is not None:
            wall = now - self._last[0]
            self._others = max(0.0, (busy - self._last[2]) - (sample[1] - self._last[1])) / wall
        self._last = sample
        self._free = max(1, round(len(cpus) - self._others))

    def free(self) -> int:
        """This process's CPUs minus the cores other processes keep busy, rounded, at least one (a large number
        where that cannot be measured). About 0.3 us between samples."""
        last = self._last
        if last is None or time.monotonic() - last[0] >= self.interval:
            with self._lock:
                self._sample()
        return self._free


core_share = CoreShare()


@functools.cache
def _max_threads() -> int:
    # numba.config.NUMBA_NUM_THREADS: the most threads numba runs in this process (fixed once numba is imported)
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def guarded(method):
    """Decorator for a backend method that runs compiled parallel code: see :func:`parallel_call`; the
    backend's ``n_threads`` attribute (None by default) sets the thread count of the call; with None, the call
    runs on numba's count minus the cores other processes keep busy (:class:`CoreShare`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        n_threads = self.n_threads
        if n_threads is None:
            free = core_share.free()
            if free < _max_threads():  # else no count numba allows can exceed it: skip get_num_threads (1 us)
                import numba

                if numba.get_num_threads() > free:
                    n_threads = free
        with parallel_call(n_threads):
            return method(self, *args, **kwargs)

    return wrapper
