"""``python -m fastbp info``: what fastbp runs on here (versions, threads, kernel cache, CUDA).

Prints fastbp's, numba's, numba-cuda's and numpy's versions, numba's threading layer and thread count, the
directory compiled CPU kernels are cached in and whether it is writable, and whether the CUDA target is
usable (device name, compute capability, driver version) or exactly why not. ``--json`` prints the same
as one JSON object. Takes a second or two (it starts numba's thread pool to learn the threading layer).

>>> from fastbp.info import collect
>>> sorted(collect(probe_threads=False))[:3]
['cache', 'cuda', 'fastbp']
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from importlib import metadata


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _writable(path: str) -> bool:
    """True when a file can be created in ``path`` (or in its nearest existing parent, created on demand)."""
    probe = path
    while probe and not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".fastbp-probe-"):
            pass
        return True
    except OSError:
        return False


def _threading(probe: bool) -> dict:
    import numba

    info = {"configured_layer": numba.config.THREADING_LAYER, "threads": numba.get_num_threads(),
            "max_threads": numba.config.NUMBA_NUM_THREADS}
    if probe:
        try:
            from numba import njit, prange

            @njit(parallel=True, cache=False)
            def _touch(n):  # the smallest parallel function: it makes numba pick a threading layer
                total = 0
                for i in prange(n):
                    total += i
                return total

            _touch(4)
        except Exception as error:  # noqa: BLE001 - report, don't fail
            info["layer_error"] = f"{type(error).__name__}: {error}"
    try:
        info["layer"] = numba.threading_layer()
    except ValueError:
        info["layer"] = None  # no parallel function has run yet in this process
    return info


def _cache() -> dict:
    from . import _jit

    info = {"enabled": _jit.CACHE_ENABLED, "FASTBP_CACHE": os.environ.get("FASTBP_CACHE"),
            "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR") or None, "directory": None, "writable": False}
    if not _jit.CACHE_ENABLED:
        info["note"] = "disabled by FASTBP_CACHE: kernels compile in every new process"
        return info
    try:
        from .kernels import cpu

        cache = getattr(cpu.train_epochs, "_cache", None)
        path = getattr(cache, "_cache_path", None)
    except Exception as error:  # noqa: BLE001
        info["note"] = f"could not locate the cache: {type(error).__name__}: {error}"
        return info
    if path is None:
        info["note"] = "numba found no writable cache location: kernels compile in every new process"
        return info
    info["directory"] = path
    info["writable"] = _writable(path)
    return info


def _cuda() -> dict:
    from .backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    info = {"usable": reason is None, "reason": reason}
    try:
        from numba import cuda

        if reason is None or cuda.is_available():
            device = cuda.get_current_device()
            name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
            info["device"] = name
            info["compute_capability"] = ".".join(map(str, device.compute_capability))
            try:
                from numba.cuda.cudadrv.driver import driver

                version = driver.get_version()  # (major, minor) of the CUDA driver API
                info["driver"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
            except Exception as error:  # noqa: BLE001
                info["driver"] = f"unknown ({type(error).__name__})"
        elif reason is None:
            info["reason"] = "numba.cuda.is_available() is False"
    except Exception as error:  # noqa: BLE001 - numba-cuda missing or broken: the reason above says why
        if reason is None:
            info["usable"] = False
            info["reason"] = f"{type(error).__name__}: {error}"
    return info


def collect(probe_threads: bool = True) -> dict:
    """Everything ``info`` reports, as a dict (keys: versions, python, threading, cache, cuda...)."""
    from ._version import __version__

    return {
        "fastbp": __version__,
        "numba": _version("numba"),
        "numba_cuda": _version("numba-cuda"),
        "numpy": _version("numpy"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "threading": _threading(probe_threads),
        "cache": _cache(),
        "cuda": _cuda(),
    }


def format_report(info: dict) -> str:
    """The human-readable report of :func:`collect`'s dict."""
    t, c, g = info["threading"], info["cache"], info["cuda"]
    numba_cuda = info["numba_cuda"] or "not installed (the cuda extra: pip install -e '.[cuda]' in the clone)"
    lines = [
        f"fastbp      {info['fastbp']}",
        f"numba       {info['numba']}",
        f"numba-cuda  {numba_cuda}",
        f"numpy       {info['numpy']}",
        f"python      {info['python']}",
        f"platform    {info['platform']}",
        f"threading   layer {t['layer'] or 'not started'} (configured: {t['configured_layer']}), "
        f"{t['threads']} threads (max {t['max_threads']})" + (f"; {t['layer_error']}" if "layer_error" in t else ""),
    ]
    if c["directory"]:
        lines.append(f"cache       {c['directory']} ({'writable' if c['writable'] else 'NOT writable'})")
    else:
        lines.append(f"cache       none: {c.get('note', '')}")
    if g["usable"]:
        lines.append(f"cuda        usable: {g.get('device')} (compute capability {g.get('compute_capability')}, "
                     f"driver {g.get('driver')})")
    else:
        lines.append(f"cuda        not usable: {g['reason']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbp info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
