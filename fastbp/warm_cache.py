"""``python -m fastbp precompile`` and ``fastbp.precompile()``: warm the kernel cache before the first fit.

fastbp's CPU kernels compile on first use (seconds for a first fit on an empty cache: docs/performance.md)
and numba keeps them in its disk cache, so the cost is paid once per machine, fastbp version and numba
version. ``precompile`` pays it ahead of time, in one process: run it where the kernels will be used (an
image build, a job's setup step) so that the first ``fit`` of a user's script loads its kernels instead of
compiling them. numba's cache entries are specific to the CPU model they were compiled on (an entry made
on another CPU is recompiled), so run it on the kind of machine that will train.

What it compiles: everything the CPU target's ``fit``, ``predict``, ``evaluate`` and ``loss_and_grads``
reach (with and without ``sample_weight``, a validation set, gradient clipping) for each chosen dtype, on
two networks: a narrow one (every layer at most 32 wide: its unweighted fits take the fused narrow kernel,
everything else the product engine) and a wide one (the product engine only). The fused narrow kernel
compiles its activations and loss in (the optimizer is a run-time code), so it is compiled for every
combination of the chosen activations and losses; the product engine and its drivers take all three as
run-time codes and compile once per dtype. Other choices (a mix of activations in one narrow network, a loss
or optimizer not chosen) still work: they compile on first use. The CUDA target's kernels are not cached on
disk by numba-cuda and are not compiled here.

The work is done through the public ``Trainer`` on a few rows of data, so it reaches exactly what a user's
calls reach; the data are tiny, so nearly all the time is compilation. numba compiles one function at a time
per process, so the configurations are shared among ``processes`` processes (default: one per CPU this
process may use): this one and helpers started with ``python -m fastbp.warm_cache`` (an internal entry point),
each compiling its share into the same cache. A dtype's product engine and drivers stay in one process (two
would compile them twice); each further fused narrow kernel is a share of its own. Other processes may compile
into the same cache meanwhile (fastbp's cache entries are keyed so that concurrent writers cannot mix them up,
numba #10128), but what they compile before this finishes is compiled twice.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np

from . import _standby
from .kernels.pointwise import ACTIVATIONS, LOSSES, OPTIMIZERS

DTYPES = ("float32", "float64")
# The defaults: the tutorial's activations and tanh, every loss, the two optimizers most fits use. 12 fused
# narrow kernels per dtype (3 activations x 4 losses); ``activations="all"`` etc. widen the set.
DEFAULT_ACTIVATIONS = ("relu", "sigmoid", "tanh")
DEFAULT_LOSSES = tuple(LOSSES)
DEFAULT_OPTIMIZERS = ("sgd", "adam")

# Layer widths of the two networks (see the module docstring): a narrow one (the fused kernel; its weighted fits,
# evaluations and gradients take the product engine) and a wide one (the product engine). 40 > 32, the widest
# layer of the fused narrow kernel's networks (fastbp.kernels.narrow.NARROW_MAX_WIDTH).
NARROW_SIZES = (3, 8, 4)
WIDE_SIZES = (3, 40, 4)
ROWS = 24  # more than a batch, so fits take several steps and a partial last batch
BATCH = 8
# Relative compile costs, for sharing the work among processes (AMD EPYC Zen 4, float32, one process: a dtype's
# product engine and drivers with the first fused narrow kernel 12.5 s, each further fused narrow kernel 2.2 s).
GENERAL_PATH_COST = 5
NARROW_KERNEL_COST = 1


def _names(argument: str, value, table, default):
    """The chosen names as a tuple: ``None`` -> default, ``"all"`` -> every name of ``table``."""
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        value = tuple(table) if value == "all" else (value,)
    value = tuple(value)
    unknown = [name for name in value if name not in table]
    if unknown or not value:
        raise ValueError(f"{argument} must be names from {sorted(table)} (or 'all'); got {value!r}")
    return value


@contextmanager
def _counting_compilations():
    """Counts the fastbp functions numba compiles in the block (a cache load is not a compilation): yields a
    one-element list whose item is the count so far."""
    from numba.core import event

    count = [0]

    class Listener(event.Listener):
        def on_start(self, ev):
            if getattr(ev.data["dispatcher"].py_func, "__module__", "").startswith("fastbp"):
                count[0] += 1

        def on_end(self, ev):
            pass

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield count
    finally:
        event.unregister("numba:compile", listener)


def _data(sizes, loss: str, dtype, rng):
    X = rng.standard_normal((ROWS, sizes[0])).astype(dtype)
    k = sizes[-1]
    if loss == "softmax_cross_entropy":
        y = np.arange(ROWS) % k
    elif loss == "binary_cross_entropy":
        y = (rng.random((ROWS, k)) < 0.5).astype(dtype)
    elif loss == "poisson":
        y = rng.poisson(1.0, (ROWS, k)).astype(dtype)
    else:
        y = rng.standard_normal((ROWS, k)).astype(dtype)
    return X, y


def _exercise(sizes, activation: str, loss: str, optimizer: str, dtype, general_path_too: bool, rng) -> None:
    """One configuration through every public CPU call; general_path_too adds the calls whose kernels take
    activation, loss and optimizer as runtime codes (compiled once per dtype and path, whatever the codes)."""
    from .model import MLP
    from .trainer import Trainer

    X, y = _data(sizes, loss, dtype, rng)
    model = MLP(list(sizes), activation=activation, dtype=dtype, seed=0)
    trainer = Trainer(model, loss=loss, optimizer=optimizer, lr=1e-3, batch_size=BATCH)
    trainer.fit(X, y, epochs=2)  # the fused narrow kernel for a narrow network, else the general path
    if not general_path_too:
        return
    weights = np.linspace(0.5, 1.5, ROWS)
    trainer.fit(X, y, epochs=1, sample_weight=weights, validation_data=(X, y))
    Trainer(model, loss=loss, optimizer=optimizer, lr=1e-3, batch_size=None).fit(X, y, epochs=1)
    Trainer(model, loss=loss, optimizer=optimizer, lr=1e-3, batch_size=BATCH, clip_grad_norm=1.0).fit(X, y, epochs=1)
    trainer.predict(X)
    trainer.predict(X[:1])
    trainer.evaluate(X, y)
    trainer.evaluate(X, y, sample_weight=weights)
    trainer.loss_and_grads(X, y)
    trainer.loss_and_grads(X, y, sample_weight=weights)
    # The functions the drivers call by slots filled on request, for every network that needs them: the products'
    # sigmoid and tanh, and each loss's output transform (the general path's kernels take the activation and the
    # loss as run-time codes, so this job's own need not be among them).
    from numba import from_dtype

    from .kernels import cpu, gemm
    from .kernels.pointwise import SIGMOID, TANH

    for function in gemm.activations_on_request([SIGMOID, TANH]) + [cpu.transform_for(code) for code in
                                                                     LOSSES.values()]:
        function.fill(from_dtype(np.dtype(dtype)))


def precompile(dtypes=DTYPES, activations=None, losses=None, optimizers=None, verbose: bool = False,
               processes=None) -> dict:
    """Compile the CPU kernels of the common configurations into numba's disk cache (see the module docstring).

    Parameters
    ----------
    dtypes : names or numpy dtypes among float32, float64 (default both: scikit-learn's estimators train
        float64 input in float64).
    activations, losses, optimizers : names (or ``"all"``) for the fused narrow kernel's combinations;
        default relu, sigmoid, tanh; every loss; sgd and adam.
    verbose : print one line per configuration as it is done.
    processes : how many processes compile at once (default: one per CPU this process may use); 1 keeps all
        of it in this process.

    Returns ``{"seconds", "compiled", "configurations", "cache_directory"}``: wall time, how many fastbp
    functions numba compiled (0 when everything was already cached), configurations run, where the cache is.
    Raises RuntimeError when kernels cannot be cached (``FASTBP_CACHE=0``, or no writable cache directory):
    there would be nothing to fill.
    """
    from . import info

    if isinstance(dtypes, (str, np.dtype, type)):
        dtypes = (dtypes,)
    try:
        chosen_dtypes = tuple(dict.fromkeys(np.dtype(d).name for d in dtypes))
    except TypeError as error:
        raise ValueError(f"dtypes must name float32 and/or float64; got {dtypes!r} ({error})") from None
    if not chosen_dtypes or any(d not in DTYPES for d in chosen_dtypes):
        raise ValueError(f"dtypes must name float32 and/or float64; got {dtypes!r}")
    chosen_activations = _names("activations", activations, ACTIVATIONS, DEFAULT_ACTIVATIONS)
    chosen_losses = _names("losses", losses, LOSSES, DEFAULT_LOSSES)
    chosen_optimizers = _names("optimizers", optimizers, OPTIMIZERS, DEFAULT_OPTIMIZERS)
    if not isinstance(verbose, (bool, int, np.bool_)):
        raise TypeError(f"verbose must be a bool; got {type(verbose).__name__}")
    if processes is None:
        from ._jit import usable_cpus

        processes = usable_cpus()
    elif isinstance(processes, bool) or not isinstance(processes, (int, np.integer)) or processes < 1:
        raise ValueError(f"processes must be a positive integer or None; got {processes!r}")
    cache = info.collect(probe_threads=False)["cache"]
    if not cache["writable"]:
        raise RuntimeError("fastbp.precompile: compiled kernels cannot be cached here "
                           f"({cache.get('note') or 'cache directory ' + str(cache['directory']) + ' is not writable'})"
                           "; set NUMBA_CACHE_DIR to a writable folder (and FASTBP_CACHE unset or 1)")

    jobs = _jobs(chosen_dtypes, chosen_activations, chosen_losses, chosen_optimizers)
    _standby.release()  # precompile's processes compile without compile helpers
    shares = _shares(jobs, int(processes))
    start = time.perf_counter()
    helpers = [_start_helper(share, verbose) for share in shares[1:]]
    try:
        compiled = _run(shares[0] if shares else [], verbose, start)
        for helper in helpers:
            out, err = helper.communicate()
            if helper.returncode != 0:
                raise RuntimeError(f"fastbp.precompile: a helper process failed (exit {helper.returncode}): "
                                   f"{err.strip()[-2000:]}")
            lines = out.strip().splitlines()
            if verbose:
                print("\n".join(lines[:-1]), flush=True)
            compiled += json.loads(lines[-1])["compiled"]
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    return {"seconds": time.perf_counter() - start, "compiled": compiled, "configurations": len(jobs),
            "cache_directory": cache["directory"]}


def _jobs(dtypes, activations, losses, optimizers) -> list:
    """The configurations to run, as (dtype, network, activation, loss, optimizer, general_path_too)."""
    jobs = []
    for dtype in dtypes:
        for network in ("wide", "narrow"):
            for index, (activation, loss, optimizer) in enumerate(itertools.product(activations, losses,
                                                                                    optimizers)):
                # The general path compiles once per dtype and path: the first combination reaches it.
                general_path_too = index == 0
                if network == "wide" and not general_path_too:
                    break  # the wide network only takes the general path: nothing else to compile
                jobs.append((dtype, network, activation, loss, optimizer, general_path_too))
    return jobs


def _shares(jobs, processes: int) -> list:
    """``jobs`` split into at most ``processes`` lists, the largest first (the longest processing time first
    rule): a dtype's general-path jobs together, and the jobs of one fused narrow kernel (a dtype and
    narrow.kernel_key: the optimizer is a run-time code) together, so that no two processes compile the same
    thing."""
    from .kernels import narrow  # here: `import fastbp` imports this module, and no kernel module yet

    def kernel_of(job):  # the fused narrow kernel a narrow job compiles (relu and leaky_relu share theirs)
        return (job[0],) + narrow.kernel_key([ACTIVATIONS[job[2]]], LOSSES[job[3]])

    general_kernels = {kernel_of(job) for job in jobs if job[5] and job[1] == "narrow"}
    bundles = {}
    for job in jobs:
        kernel = kernel_of(job)
        key = ("general", job[0]) if job[5] or kernel in general_kernels else ("narrow",) + kernel
        bundles.setdefault(key, []).append(job)
    cost = {key: GENERAL_PATH_COST if key[0] == "general" else NARROW_KERNEL_COST for key in bundles}
    shares = [[] for _ in range(min(processes, len(bundles)))]
    loads = [0] * len(shares)
    for key in sorted(bundles, key=lambda k: -cost[k]):
        lightest = loads.index(min(loads))
        shares[lightest].extend(bundles[key])
        loads[lightest] += cost[key]
    for share in shares:  # each process runs its share in the order precompile lists them
        share.sort(key=jobs.index)
    return shares


def _run(jobs, verbose: bool, start: float) -> int:
    """Run ``jobs`` in this process, one compile process at a time (no compile-session helpers: the other
    shares are compiling beside it); the number of fastbp functions compiled."""
    from . import _jit

    rng = np.random.default_rng(0)
    with _counting_compilations() as compiled, _jit.one_compile_process():
        for dtype, network, activation, loss, optimizer, general_path_too in jobs:
            sizes = WIDE_SIZES if network == "wide" else NARROW_SIZES
            _exercise(sizes, activation, loss, optimizer, dtype, general_path_too, rng)
            if verbose:
                path = "general path" if network == "wide" else "fused narrow kernel"
                print(f"fastbp precompile: {dtype} {path} {activation} {loss} {optimizer} "
                      f"({time.perf_counter() - start:.1f} s, {compiled[0]} compiled)", flush=True)
    return compiled[0]


def _start_helper(jobs, verbose: bool) -> subprocess.Popen:
    from ._jit import helper_environment

    # FASTBP_COMPILE_PROCESSES=1: it compiles its share alone (its import then starts no standby helper)
    return subprocess.Popen([sys.executable, "-m", "fastbp.warm_cache", "--share", json.dumps(jobs)]
                            + (["--verbose"] if verbose else []), env=helper_environment(FASTBP_COMPILE_PROCESSES="1"),
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _helper_main(argv) -> int:
    """``python -m fastbp.warm_cache --share JOBS [--verbose]``: one helper's share (see precompile)."""
    parser = argparse.ArgumentParser(prog="python -m fastbp.warm_cache")
    parser.add_argument("--share", required=True)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    compiled = _run([tuple(job) for job in json.loads(args.share)], args.verbose, time.perf_counter())
    print(json.dumps({"compiled": compiled}), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastbp precompile",
        description="Compile fastbp's CPU kernels for the common configurations into numba's disk cache, so "
                    "that first fits load them instead of compiling (run it on the machine kind that trains).")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES,
                        help="dtypes to compile for (default: both)")
    parser.add_argument("--activations", nargs="+", default=None,
                        help="activations of the fused narrow kernel, or 'all' (default: "
                             f"{' '.join(DEFAULT_ACTIVATIONS)})")
    parser.add_argument("--losses", nargs="+", default=None, help="losses, or 'all' (default: all)")
    parser.add_argument("--optimizers", nargs="+", default=None,
                        help=f"optimizers, or 'all' (default: {' '.join(DEFAULT_OPTIMIZERS)})")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes compiling at once (default: one per CPU this process may use)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    def one_or_many(values):
        return values[0] if values is not None and values == ["all"] else values

    try:
        summary = precompile(args.dtype, one_or_many(args.activations), one_or_many(args.losses),
                             one_or_many(args.optimizers), verbose=not args.quiet, processes=args.processes)
    except (ValueError, RuntimeError) as error:
        print(f"fastbp precompile: {error}", file=sys.stderr)
        return 1
    print(f"fastbp precompile: {summary['configurations']} configurations, {summary['compiled']} functions "
          f"compiled in {summary['seconds']:.1f} s; cache: {summary['cache_directory']}")
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
