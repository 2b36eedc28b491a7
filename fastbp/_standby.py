"""A compile helper started by ``import fastbp`` where numba's disk cache has none of fastbp's kernels yet: a new
interpreter that imports numba and fastbp's kernels and sets up numba's compiler while the user's process imports
too, then waits for the first compile helper that process would start (fastbp._jit._Helper) and becomes it.

Why: a helper started when a trainer is made began compiling 0.35-0.45 s after the user's process did (a new
interpreter importing numba and fastbp, then numba's first-compile set-up), and on a cold first predict it was the
last to finish: the predict waited for its product engine (AMD EPYC Zen 4, 2 vCPUs, 2026-12-07). On standby it
has done that part by the time the trainer is made.

This module imports nothing heavy (it runs first in ``import fastbp``, before numba is imported). The standby is
started only where a helper would be (fastbp._jit._helper_allowed) and the cache looks cold (no cached product
engine, of any dtype, where numba would put it): with a warm cache it would only take a core from the user's first
call. It stops by itself once its parent has exited, or after IDLE_SECONDS without being taken; fastbp.precompile
(which compiles on processes of its own) lets it go at once. The claim folder protocol is fastbp._jit's: whichever
side creates TAKEN first decides whether the standby works (the parent took it) or stops (it expired).
"""
from __future__ import annotations

import os
import sys

WORKER_VARIABLE = "FASTBP_COMPILE_WORKER"  # set in a helper's environment: it never starts another
TAKEN = "taken"  # created (exclusively) in the standby's claim folder by the side that decides its fate
ASSIGNMENT = "assignment"  # its work, written by the parent: the dtype's name, then one 'module:attribute' a line
EXIT_MARKER = "parent-exited"  # written by a parent that exits or lets its helper go (fastbp._jit.exit_marker)
IDLE_SECONDS = 60.0  # a script's first trainer usually comes within seconds of its import; data loading can take longer
# The function whose cache index says "compiled here before": the product engine, a leaf of every fit and predict.
PROBE_FUNCTION = "gemm._product_by_symbol"

_standby = None  # [process, folder, owner pid] while one is waiting for this process, else None


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cache_enabled() -> bool:
    return os.environ.get("FASTBP_CACHE", "1").lower() not in ("0", "false", "no", "off")


def helpers_allowed() -> bool:
    """Whether this process's environment lets it start compile helpers (fastbp._jit, "compile sessions")."""
    # getattr(sys, "frozen"): a bundled application's sys.executable is the application, not Python
    if not cache_enabled() or os.environ.get(WORKER_VARIABLE) or getattr(sys, "frozen", False):
        return False
    if os.environ.get("FASTBP_COMPILE_PROCESSES", "").strip() == "1":
        return False
    return usable_cpus() >= 2


def helper_environment(**variables) -> dict:
    """The environment of a process that compiles for this one: this one's, so that it keys its cache entries
    alike (NUMBA_CACHE_DIR, NUMBA_CPU_NAME, FASTBP_SIMD_BITS ...), with this fastbp first on its path, no compile
    notice, and ``variables``."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTBP_QUIET_COMPILE="1", **variables)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def kernel_cache_folder():
    """Where numba's disk cache keeps fastbp.kernels' compiled functions, as numba's cache locators find it
    (numba.core.caching: NUMBA_CACHE_DIR, else the package's __pycache__ where writable, else the user-wide cache),
    or None where this cannot tell (other locators, a numba config file, no known user cache folder)."""
    import hashlib

    kernels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
    # numba's _CacheLocator.get_suitable_cache_subpath: the source folder's name and the SHA-1 of its path
    subpath = "kernels_" + hashlib.sha1(kernels.encode()).hexdigest()
    if os.environ.get("NUMBA_CACHE_LOCATOR_CLASSES") or os.path.exists(".numba_config.yaml"):
        return None
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.path.join(os.environ["NUMBA_CACHE_DIR"], subpath)
    in_tree = os.path.join(kernels, "__pycache__")
    if os.access(in_tree if os.path.isdir(in_tree) else kernels, os.W_OK):
        return in_tree
    if sys.platform.startswith("linux"):
        user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        return os.path.join(user_cache, "numba", subpath)
    return None


def cache_looks_cold() -> bool:
    """True where numba's disk cache certainly lacks fastbp's product engine (for this Python): a first fit or
    predict will compile for seconds. False where it has it, or where this cannot tell."""
    folder = kernel_cache_folder()
    if folder is None:
        return False
    prefix = PROBE_FUNCTION + "-"
    suffix = f".py{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}.nbi"  # numba's index name
    try:
        names = os.listdir(folder)
    except OSError:  # not there yet: nothing cached
        return True
    return not any(name.startswith(prefix) and name.endswith(suffix) for name in names)


def start(idle_seconds: float = IDLE_SECONDS) -> None:
    """Start the standby helper where a helper would be allowed and the cache looks cold (``import fastbp``)."""
    global _standby
    if _standby is not None or not helpers_allowed() or os.environ.get("FASTBP_SIMD_BITS", "").strip():
        return  # a forced vector width is not part of numba's cache key: gemm is then not cached (simd.py)
    if not cache_looks_cold():
        return
    import subprocess
    import tempfile

    folder = tempfile.mkdtemp(prefix="fastbp-compile-")
    command = [sys.executable, "-m", "fastbp._compile_worker", folder, str(os.getpid()), "--standby", str(idle_seconds)]
    try:
        # in a session of its own, as every helper (fastbp._jit._Helper says why)
        process = subprocess.Popen(command, env=helper_environment(**{WORKER_VARIABLE: "1"}),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    except OSError:
        os.rmdir(folder)
        return
    _standby = [process, folder, os.getpid()]


def take():
    """The standby helper's (process, claim folder), now this process's to give work to (write_assignment); None
    where there is none (not started, expired, exited, or inherited through fork)."""
    global _standby
    standby, _standby = _standby, None
    if standby is None:
        return None
    process, folder, owner = standby
    if owner != os.getpid() or process.poll() is not None:
        return None
    try:
        if not claim_file(folder, TAKEN):
            return None
    except OSError:  # the folder is gone (the standby expired, or stopped, and removed it)
        return None
    return process, folder


def write_assignment(folder: str, dtype, names) -> None:
    """Give the taken standby its work: ``dtype``'s name and the 'module:attribute' names, written whole at once."""
    partial = os.path.join(folder, ASSIGNMENT + ".partial")
    with open(partial, "w") as out:
        out.write("".join(f"{line}\n" for line in [str(dtype), *names]))
    os.replace(partial, os.path.join(folder, ASSIGNMENT))


def release() -> None:
    """Let the standby helper go now (its claim folder is taken with no assignment: it stops and removes it)."""
    taken = take()
    if taken is not None:
        open(os.path.join(taken[1], EXIT_MARKER), "wb").close()


def claim_file(folder: str, name: str) -> bool:
    """Create ``name`` in ``folder`` exclusively: True for the one process that does, False for the others (a
    claim folder's protocol: fastbp._jit.claim, and TAKEN above)."""
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
