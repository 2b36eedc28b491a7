"""Time fastbp's product engine (fastbp.kernels.gemm) against numpy/OpenBLAS and the current CPU kernels.

    python -m dev.bench_products [--threads 1 2] [--rounds 9] [--dtype float32] [--quick]

For each layer shape (batch, n_in, n_out) and product (forward, weight gradient, input gradient) it times,
in ONE process, alternating implementations within each round:
    gemm    fastbp.kernels.gemm: forward act(inp @ W + b) with relu, dW = inp.T @ dout and db, dinp = (dout @ W.T)
            * relu'(inp); each call includes its packing (the forward packs W, the input gradient W^T, the
            weight gradient dout and inp) and its fused epilogue;
    numpy   np.dot into a preallocated output (OpenBLAS; the product only, no bias or activation).
Every implementation runs on the same number of threads (numba.set_num_threads and threadpoolctl).
Each timing sample repeats a call for at least 20 ms; the table shows medians over rounds of GFLOP/s
(2 * batch * n_in * n_out per product) and the median over rounds of each round's time ratio (gemm time of
the other / gemm time: > 1 means gemm is faster). The CPU model and vector width head the table: timings on
a machine shared with other work are noisy, so compare ratios, not absolute figures across runs.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import numba
import numpy as np

SHAPES = [  # (batch, n_in, n_out, label)
    (512, 1024, 1024, "512x1024 @ 1024x1024 (W4 hidden)"),
    (128, 784, 256, "W3 784->256, batch 128"),
    (128, 256, 256, "W3 256->256, batch 128"),
    (128, 256, 10, "W3 256->10, batch 128"),
    (512, 1024, 10, "W4 1024->10, batch 512"),
]
PRODUCTS = ("forward", "weight_grad", "input_grad")
# Before each implementation's timing: OpenBLAS's threads spin for about 50 ms after a call (fastbp/_blas_free.py),
# holding the core that gemm's second thread needs. Without the pause, gemm on 2 threads ran at its 1-thread speed
# here (512x1024 @ 1024x1024 forward: 100-117 GFLOP/s against 205-215 measured alone; AMD EPYC Zen 4).
SETTLE_SECONDS = 0.2


def cpu_name() -> str:
    """lscpu's model name and LLVM's name for this CPU (lscpu says only "AMD EPYC" on some VMs)."""
    import llvmlite.binding as ll

    return f"{_lscpu_model()} ({ll.get_host_cpu_name()})"


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _build(product, batch, n_in, n_out, dtype, rng):
    """{implementation: zero-argument callable} for one product on fresh data."""
    from fastbp.kernels import gemm
    from fastbp.kernels.pointwise import IDENTITY, RELU

    inp = rng.normal(size=(batch, n_in)).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    dout = rng.normal(size=(batch, n_out)).astype(dtype)
    panels = np.empty(gemm.workspace_size(batch, n_in, n_out, dtype), dtype)
    if product == "forward":
        out, out_np = (np.empty((batch, n_out), dtype) for _ in range(2))
        return {"gemm": lambda: gemm.product(gemm.FORWARD, RELU, out, inp, w, b, out, panels),
                "numpy": lambda: np.dot(inp, w, out=out_np)}
    if product == "weight_grad":
        dw, dw_np = (np.empty((n_in, n_out), dtype) for _ in range(2))
        db = np.empty(n_out, dtype)
        return {"gemm": lambda: gemm.product(gemm.WEIGHT_GRAD, IDENTITY, dw, inp, dout, db, dw, panels),
                "numpy": lambda: np.dot(inp.T, dout, out=dw_np)}
    y = np.abs(inp)  # a relu layer's output
    dinp, dinp_np = (np.empty((batch, n_in), dtype) for _ in range(2))
    return {"gemm": lambda: gemm.product(gemm.INPUT_GRAD, RELU, dinp, dout, w, panels, y, panels),
            "numpy": lambda: np.dot(dout, w.T, out=dinp_np)}


def _repetitions(call, target=0.02):
    start = time.perf_counter()
    call()
    elapsed = time.perf_counter() - start
    return max(1, int(target / max(elapsed, 1e-7)))


def measure(threads, rounds, dtype, shapes, products=PRODUCTS):
    """Rows of (threads, label, product, {impl: median GFLOP/s}, {impl: median ratio of its time to gemm's})."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    rows = []
    numba.set_num_threads(threads)
    with threadpool_limits(threads):
        for batch, n_in, n_out, label in shapes:
            flop = 2.0 * batch * n_in * n_out
            for product in products:
                calls = _build(product, batch, n_in, n_out, dtype, rng)
                for call in calls.values():  # compile, warm caches
                    call()
                reps = {name: _repetitions(call) for name, call in calls.items()}
                times = {name: [] for name in calls}
                for _ in range(rounds):
                    for name, call in calls.items():
                        time.sleep(SETTLE_SECONDS)
                        start = time.perf_counter()
                        for _ in range(reps[name]):
                            call()
                        times[name].append((time.perf_counter() - start) / reps[name])
                gflops = {name: flop / statistics.median(t) / 1e9 for name, t in times.items()}
                ratios = {name: statistics.median(o / g for o, g in zip(times[name], times["gemm"]))
                          for name in calls if name != "gemm"}
                rows.append((threads, label, product, gflops, ratios))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--quick", action="store_true", help="the 512x1024x1024 forward only, 5 rounds")
    parser.add_argument("--products", nargs="+", choices=PRODUCTS, default=list(PRODUCTS))
    args = parser.parse_args(argv)
    from fastbp.kernels import gemm, simd

    shapes, products, rounds = SHAPES, args.products, args.rounds
    if args.quick:
        shapes, products, rounds = SHAPES[:1], ["forward"], 5
    dtype = np.dtype(args.dtype).type
    print(f"CPU: {cpu_name()}; vectors: {simd.VECTOR_BITS} bits ({simd.VECTOR_BITS_REASON}); tile "
          f"{gemm.TILE_ROWS} x {gemm.tile_columns(dtype)} {args.dtype}; numba {numba.__version__}, numpy "
          f"{np.__version__}; {rounds} alternating rounds, medians")
    print(f"{'threads':>7}  {'shape':34} {'product':12} {'gemm':>7} {'numpy':>7}   "
          f"{'numpy/gemm':>10}   (GFLOP/s; time ratios, > 1: gemm faster)")
    for threads in args.threads:
        for _, label, product, gflops, ratios in measure(threads, rounds, dtype, shapes, products):
            print(f"{threads:>7}  {label:34} {product:12} {gflops['gemm']:7.1f} {gflops['numpy']:7.1f}   "
                  f"{ratios['numpy']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
