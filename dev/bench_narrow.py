"""``python -m dev.bench_narrow``: the fused narrow-network kernel on W1, against today's path and the peers.

W1 (fastbp.bench.WORKLOADS): 1-16-1, sigmoid, MSE, full batch of 100, SGD lr 0.01, the timed unit is a whole
1000-epoch fit from the same initial weights (PyTorch's nn.Linear initialisation, drawn with numpy). The
implementations run in this one process, alternately, round after round; each round runs one unit back to
back for at least ``--min-seconds`` and records the mean per unit; the table gives the median over rounds and
the median of the per-round ratios (a ratio > 1: the narrow kernel is faster).

    narrow kernel       the fused narrow kernel (narrow.kernel_for) called directly (buffers built once), 1000
                        epochs in one call
    cpu kernel          fastbp.kernels.cpu.train_epochs (the product engine) called directly, 1000 epochs in one call
    Trainer.fit         fastbp.Trainer(...).fit, which runs W1 on the narrow kernel (the Python around its calls)
    pytorch             nn.Sequential + optim.SGD, eager, one step per epoch
    jax                 all 1000 epochs in one jitted lax.fori_loop

Other modes: ``--compile`` (cold compile and warm cache load of the W1 kernel, each in a fresh subprocess),
``--widths`` / ``--shapes`` (the narrow kernel against cpu.train_epochs on wider networks: the supports()
threshold),
``--asm`` (packed FMAs in the compiled hot loops; ``--cpu skylake-avx512`` compiles for another CPU).

    python -m dev.bench_narrow [--rounds 7] [--min-seconds 0.3] [--dtype float32] [--compile]
                                        [--widths 8,32,128] [--shapes 64-128-10] [--batch-size 32]
                                        [--asm] [--cpu NAME] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

# The repository's root: its child processes import dev.bench_narrow from there.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name() -> str:
    """The CPU's model name (lscpu / /proc/cpuinfo) and LLVM's name for it."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import llvmlite.binding as ll

        model += f" (LLVM: {ll.get_host_cpu_name()})"
    except Exception:  # noqa: BLE001 - informational only
        pass
    return model


def time_unit(run, min_seconds: float) -> float:
    """Mean seconds per call of run(), calling it back to back for at least min_seconds."""
    calls = 0
    started = time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return elapsed / calls


# --- W1 set-up -----------------------------------------------------------------------------------------------
class W1:
    """W1's data, initial weights and the flat-buffer arguments shared by the direct kernel calls."""

    def __init__(self, dtype=np.float32, epochs=1000):
        from fastbp._jit import read_only
        from fastbp.bench import WORKLOADS, linear_init, make_data
        from fastbp.kernels.pointwise import ACTIVATIONS, N_HYPER
        from fastbp.layout import Layout

        self.spec = WORKLOADS["W1"]
        self.epochs = epochs
        self.dtype = np.dtype(dtype)
        X, Y = make_data("W1")
        # read-only, as the CPU backend hands data to the kernels: the runners call the code Trainer.fit runs
        self.X, self.Y = read_only(X.astype(dtype)), read_only(Y.astype(dtype))
        self.weights, self.biases = linear_init(self.spec["sizes"])
        self.layout = Layout.from_sizes(self.spec["sizes"])
        self.params0 = np.empty(self.layout.n_params, dtype)
        self.layout.pack(self.weights, self.biases, self.params0)
        self.act_codes = np.array([ACTIVATIONS["sigmoid"], ACTIVATIONS["identity"]], np.int64)
        self.hyper = np.zeros(N_HYPER)
        self.lrs = np.full(epochs, self.spec["lr"])
        self.orders = np.empty((epochs, 0), np.int64)


def narrow_kernel_runner(w1: W1):
    from fastbp.kernels import narrow

    P = w1.layout.n_params
    params = w1.params0.copy()
    opt_state = np.zeros((2, P), w1.dtype)
    steps = np.zeros(1, np.int64)
    grads, backup = np.empty(P, w1.dtype), np.empty((3, P), w1.dtype)
    work = narrow.make_workspace(w1.layout.sizes, w1.dtype, w1.X.shape[0])
    losses = np.empty(w1.epochs)
    lay = w1.layout
    kernel = narrow.kernel_for(w1.act_codes, 0)
    args = (params, opt_state, steps, grads, backup, work, w1.X, w1.Y, w1.orders, w1.lrs, losses, lay.sizes,
            lay.param_offsets, lay.unit_offsets, w1.act_codes, 0, w1.hyper, w1.X.shape[0], -np.inf)

    def run():
        params[:] = w1.params0
        kernel(*args)
    run.losses = losses
    run.kernel, run.args = kernel, args
    return run


def cpu_kernel_runner(w1: W1):
    from fastbp._jit import read_only
    from fastbp.kernels import cpu

    lay, P, cap = w1.layout, w1.layout.n_params, w1.X.shape[0]
    params = w1.params0.copy()
    losses = np.empty(w1.epochs)
    args = (params, np.zeros((2, P), w1.dtype), np.zeros(1, np.int64), losses, w1.X, w1.Y,
            read_only(np.empty(0, w1.dtype)),
            w1.orders, w1.lrs, tuple(cpu.network(lay, w1.act_codes, 0)),
            tuple(cpu.make_workspace(lay, cap, 1, w1.dtype)),
            (0, w1.hyper, cap, -np.inf))

    def run():
        params[:] = w1.params0
        cpu.train_epochs(*args)
    run.losses = losses
    return run


def fit_runner(w1: W1):
    import fastbp

    model = fastbp.MLP(w1.spec["sizes"], w1.spec["activation"], seed=0, dtype=w1.dtype)
    trainer = fastbp.Trainer(model, loss=w1.spec["loss"], lr=w1.spec["lr"], batch_size=None, device="cpu", seed=0)

    def run():
        for layer in range(len(w1.weights)):
            model.weights[layer][...] = w1.weights[layer]
            model.biases[layer][...] = w1.biases[layer]
        run.history = trainer.fit(w1.X, w1.Y, epochs=w1.epochs)
    return run


def torch_runner(w1: W1):
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    layers = []
    for layer, w in enumerate(w1.weights):
        lin = torch.nn.Linear(*w.shape, dtype=torch.float32 if w1.dtype == np.float32 else torch.float64)
        layers.append(lin)
        if layer < len(w1.weights) - 1:
            layers.append(torch.nn.Sigmoid())
    net = torch.nn.Sequential(*layers)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    opt = torch.optim.SGD(net.parameters(), lr=w1.spec["lr"])
    loss_fn = torch.nn.MSELoss()
    Xt, Yt = torch.from_numpy(w1.X.copy()), torch.from_numpy(w1.Y.copy())  # torch warns on read-only arrays

    def run():
        with torch.no_grad():
            for lin, w, b in zip(linears, w1.weights, w1.biases):
                lin.weight.copy_(torch.from_numpy(w.T.astype(w1.dtype)))
                lin.bias.copy_(torch.from_numpy(b.astype(w1.dtype)))
        for _ in range(w1.epochs):
            opt.zero_grad()
            loss = loss_fn(net(Xt), Yt)
            loss.backward()
            opt.step()
        run.last_loss = float(loss)
    return run


def jax_runner(w1: W1):
    import jax
    import jax.numpy as jnp

    if w1.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    params0 = [(jnp.asarray(w.astype(w1.dtype)), jnp.asarray(b.astype(w1.dtype))) for w, b in
               zip(w1.weights, w1.biases)]
    Xj, Yj = jnp.asarray(w1.X), jnp.asarray(w1.Y)
    lr = w1.spec["lr"]

    def loss(params):
        h = Xj
        for layer, (w, b) in enumerate(params):
            h = h @ w + b
            if layer < len(params) - 1:
                h = jax.nn.sigmoid(h)
        return jnp.mean((h - Yj) ** 2)

    def step(_, params):
        grads = jax.grad(loss)(params)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

    train = jax.jit(lambda p: jax.lax.fori_loop(0, w1.epochs, step, p))

    def run():
        run.params = jax.block_until_ready(train(params0))
    return run


RUNNERS = {
    "narrow kernel": narrow_kernel_runner,
    "cpu kernel": cpu_kernel_runner,
    "Trainer.fit": fit_runner,
    "pytorch": torch_runner,
    "jax": jax_runner,
}


def compare(rounds: int, min_seconds: float, dtype, only=None):
    """{implementation: [seconds per 1000-epoch fit, one per round]}, measured alternately in this process."""
    w1 = W1(dtype)
    runners = {}
    for name, make in RUNNERS.items():
        if only and name not in only:
            continue
        try:
            runners[name] = make(w1)
        except ImportError as error:
            print(f"{name}: skipped ({error})", file=sys.stderr)
    for run in runners.values():
        run()  # warm-up: compilation (numba, XLA), first-call set-up
    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternate: slow drifts of a shared machine cancel
            times[name].append(time_unit(runners[name], min_seconds))
    return times, runners


def format_compare(times, dtype) -> str:
    base = np.array(times["narrow kernel"])
    fit = np.array(times.get("Trainer.fit", base))
    lines = [f"W1, 1000 epochs, {np.dtype(dtype).name}; CPU: {cpu_name()}; median of {len(base)} rounds",
             f"{'implementation':<16} {'per fit':>11} {'per epoch':>11} {'vs narrow kernel':>17} "
             f"{'vs Trainer.fit':>14}"]
    for name, t in times.items():
        t = np.array(t)
        lines.append(f"{name:<16} {np.median(t) * 1e3:8.3f} ms {np.median(t) * 1e6 / 1000:8.3f} us "
                     f"{np.median(t / base):16.2f}x {np.median(t / fit):13.2f}x")
    return "\n".join(lines)


# --- compile and load times ----------------------------------------------------------------------------------
_COMPILE_SNIPPET = r"""
import time
t0 = time.perf_counter()
import numpy as np
from dev.bench_narrow import W1, narrow_kernel_runner
w1 = W1(np.{dtype}, epochs=1)
t1 = time.perf_counter()
run = narrow_kernel_runner(w1)
run()
t2 = time.perf_counter()
print("IMPORT", t1 - t0, "FIRST_CALL", t2 - t1)
"""


def compile_times(dtype, repeats: int = 1):
    """(cold first call, warm first call) in seconds: a fresh NUMBA_CACHE_DIR, then the same one again."""
    results = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            pair = []
            for _ in range(2):
                out = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET.format(dtype=np.dtype(dtype).name)],
                                     cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
                match = re.search(r"IMPORT (\S+) FIRST_CALL (\S+)", out)
                pair.append((float(match.group(1)), float(match.group(2))))
            results.append(pair)
    return results


# --- the supports() threshold: wider networks ----------------------------------------------------------------
def _shape_runners(sizes, dtype, batch_size, n, epochs, rng):
    # (run_narrow, run_cpu) for layer widths sizes (last: 10 classes), relu, softmax CE, SGD, shuffled
    # batches: `epochs` epochs a call, from the same initial weights each time.
    from fastbp.kernels import cpu, narrow
    from fastbp.kernels.pointwise import ACTIVATIONS, LOSSES, N_HYPER
    from fastbp.layout import Layout

    lay = Layout.from_sizes(sizes)
    P = lay.n_params
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    Y = np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]
    params0 = (rng.normal(size=P) * 0.1).astype(dtype)
    codes = np.array([ACTIVATIONS["relu"]] * (len(sizes) - 2) + [ACTIVATIONS["identity"]], np.int64)
    orders = np.stack([rng.permutation(n) for _ in range(epochs)])
    lrs = np.full(epochs, 0.05)
    hyper = np.zeros(N_HYPER)
    loss = LOSSES["softmax_cross_entropy"]
    p_n, p_c = params0.copy(), params0.copy()
    kernel = narrow.kernel_for(codes, loss)
    narrow_args = (p_n, np.zeros((2, P), dtype), np.zeros(1, np.int64), np.empty(P, dtype), np.empty((3, P), dtype),
                   narrow.make_workspace(sizes, dtype, n), X, Y, orders, lrs, np.empty(epochs), lay.sizes,
                   lay.param_offsets, lay.unit_offsets, codes, 0, hyper, batch_size, -np.inf)
    cpu_args = (p_c, np.zeros((2, P), dtype), np.zeros(1, np.int64), np.empty(epochs), X, Y, np.empty(0, dtype),
                orders, lrs, tuple(cpu.network(lay, codes, loss)),
                tuple(cpu.make_workspace(lay, batch_size, sizes[-1], dtype)),
                (0, hyper, batch_size, -np.inf))

    def run_narrow():
        p_n[:] = params0
        kernel(*narrow_args)

    def run_cpu():
        p_c[:] = params0
        cpu.train_epochs(*cpu_args)

    return run_narrow, run_cpu


def shape_sweep(shapes, dtype, rounds: int, min_seconds: float, batch_size: int = 32, n: int = 512,
                epochs: int = 20):
    """For each network in shapes (lists of layer widths; relu, softmax CE, SGD, shuffled batches): seconds
    per epoch of the narrow kernel and of cpu.train_epochs, alternately. Returns {shape: (narrow, cpu, median
    per-round ratio cpu/narrow)}."""
    rng = np.random.default_rng(0)
    out = {}
    for sizes in shapes:
        run_narrow, run_cpu = _shape_runners(list(sizes), dtype, batch_size, n, epochs, rng)
        run_narrow()
        run_cpu()
        t_n, t_c = [], []
        for r in range(rounds):
            pair = [(t_n, run_narrow), (t_c, run_cpu)]
            for store, run in (pair if r % 2 == 0 else pair[::-1]):
                store.append(time_unit(run, min_seconds) / epochs)
        name = "-".join(str(s) for s in sizes)
        out[name] = (float(np.median(t_n)), float(np.median(t_c)), float(np.median(np.array(t_c) / np.array(t_n))))
        print(f"{name} batch {batch_size}: narrow {out[name][0] * 1e6:8.1f} us/epoch, cpu {out[name][1] * 1e6:8.1f} "
              f"us/epoch, cpu/narrow {out[name][2]:5.2f}x", flush=True)
    return out


# --- asm -----------------------------------------------------------------------------------------------------
_ASM_SNIPPET = r"""
import re, numba, numpy as np
from dev.bench_narrow import W1, narrow_kernel_runner
from fastbp.kernels import narrow
w1 = W1(np.{dtype}, epochs=1)
run = narrow_kernel_runner(w1)  # compiled, not run: the code may be for another CPU
kernel_sig = tuple(numba.typeof(a) for a in run.args)
run.kernel.compile(kernel_sig)
layer_sig = (kernel_sig[5], kernel_sig[0]) + (numba.int64,) * 5
layer = narrow.forward_sigmoid.dispatcher
layer.compile(layer_sig)
for name, f, sig in (("kernel", run.kernel, kernel_sig), ("forward_sigmoid", layer, layer_sig)):
    asm = f.inspect_asm(sig)
    for reg in ("xmm", "ymm", "zmm"):
        fma = len(re.findall(r"\tvfmadd\w+\s[^\n]*%" + reg, asm))
        div = len(re.findall(r"\tvdivp\w\s[^\n]*%" + reg, asm))
        print(name, reg, "fma", fma, "div", div)
    spills = len(re.findall(r"\tvmovup\w\s+%[yz]mm\d+, -?\d*\(%rsp\)", asm))
    print(name, "vector spills to the stack", spills)
"""


def asm_report(dtype, cpu=None) -> str:
    """Packed FMAs and divisions by register width in the compiled W1 kernel and sigmoid pass (compiled in a
    subprocess without the disk cache, for the host CPU or NUMBA_CPU_NAME=cpu)."""
    env = dict(os.environ, FASTBP_CACHE="0")
    if cpu:
        env["NUMBA_CPU_NAME"] = cpu
        env["NUMBA_CPU_FEATURES"] = ""  # the named CPU's own features (numba otherwise keeps the host's)
    out = subprocess.run([sys.executable, "-c", _ASM_SNIPPET.format(dtype=np.dtype(dtype).name)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    return out.stdout + (out.stderr[-2000:] if out.returncode else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dev.bench_narrow", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--only", default=None, help="comma-separated implementations (default: all)")
    parser.add_argument("--compile", action="store_true", help="cold compile and warm load times")
    parser.add_argument("--widths", default=None, help="comma-separated widths w: networks 16-w-w-10")
    parser.add_argument("--shapes", default=None, help="comma-separated networks, e.g. 64-128-10,784-64-10")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the width/shape sweep")
    parser.add_argument("--asm", action="store_true", help="count packed FMAs in the compiled kernel")
    parser.add_argument("--cpu", default=None, help="with --asm: compile for this CPU (e.g. skylake-avx512)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    result = {"cpu": cpu_name()}
    if args.asm:
        print(asm_report(dtype, args.cpu))
        return 0
    if args.compile:
        (cold, warm), = compile_times(dtype)
        result["compile"] = dict(cold_first_call_s=cold[1], warm_first_call_s=warm[1], import_s=warm[0])
        print(f"W1 narrow kernel ({dtype.name}): cold first call {cold[1]:.2f} s (compile), warm first call "
              f"{warm[1]:.3f} s (cache load), import {warm[0]:.2f} s")
    shapes = [[16, int(w), int(w), 10] for w in args.widths.split(",")] if args.widths else []
    shapes += [[int(s) for s in shape.split("-")] for shape in args.shapes.split(",")] if args.shapes else []
    if shapes:
        result["shapes"] = shape_sweep(shapes, dtype, max(3, args.rounds // 2), args.min_seconds, args.batch_size)
    if not args.compile and not shapes:
        only = set(args.only.split(",")) if args.only else None
        times, _ = compare(args.rounds, args.min_seconds, dtype, only)
        result["w1"] = times
        print(format_compare(times, dtype))
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
