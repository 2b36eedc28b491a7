"""``python -m fastbp bench``: time the standard workloads W1-W4 on every usable device and on plain numpy.

The workloads (the project's speed targets; see docs/performance.md):

====  ===============================  ====================  =========================  ======================
name  data                             network               training                   timed unit
====  ===============================  ====================  =========================  ======================
W1    X = linspace(-1, 1, 100),        1-16-1, sigmoid       MSE, full batch, lr 0.01   1000 epochs
      Y = 2X + N(0, 1)
W2    digits-like: 1347 x 64           64-128-10, relu       softmax CE, batch 32,      one epoch
                                                             lr 0.1
W3    60000 x 784 N(0, 1), teacher     784-256-256-10, relu  softmax CE, batch 128,     one epoch
      labels                                                 lr 0.05
W4    16384 x 1024 N(0, 1), teacher    1024-1024-1024-10,    softmax CE, batch 512,     one epoch
      labels                                                 lr 0.05
====  ===============================  ====================  =========================  ======================

W2 uses scikit-learn's digits (/16, the first 75% of a seeded split) when scikit-learn is installed and
random data of the same shape otherwise. ``--samples`` shrinks W2-W4 (for a quick look or a smoke test);
``--batch-sizes`` sweeps the batch size. ``--plot [FILE.png]`` (default bench.png) draws each workload's time
per unit against batch size, one curve per device, so the size where the GPU overtakes the CPU shows; without
``--batch-sizes`` it sweeps SWEEP (W2-W4: batch sizes up to the data set's size; W1, whose batch is the whole
data set, the number of samples). The y axis is in the workload's unit: W1's is a whole 1000-epoch fit, the
others' one epoch. Every device starts from the same initial weights (PyTorch's nn.Linear initialisation,
drawn with numpy). Times are medians over ``--repeats`` after a warm-up run that includes compilation.

    python -m fastbp bench [--workloads W1,W2] [--samples N] [--batch-sizes 32,128,512] [--repeats 3]
                           [--devices cpu,cuda] [--json] [--plot [FILE.png]]
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time

import numpy as np

WORKLOADS = {
    "W1": dict(sizes=[1, 16, 1], activation="sigmoid", loss="mse", lr=0.01, batch_size=None, samples=100,
               epochs=1000, unit="1000 epochs"),
    "W2": dict(sizes=[64, 128, 10], activation="relu", loss="softmax_cross_entropy", lr=0.1, batch_size=32,
               samples=1347, epochs=1, unit="epoch"),
    "W3": dict(sizes=[784, 256, 256, 10], activation="relu", loss="softmax_cross_entropy", lr=0.05,
               batch_size=128, samples=60000, epochs=1, unit="epoch"),
    "W4": dict(sizes=[1024, 1024, 1024, 10], activation="relu", loss="softmax_cross_entropy", lr=0.05,
               batch_size=512, samples=16384, epochs=1, unit="epoch"),
}


# What --plot sweeps when no --batch-sizes are given: W2-W4 batch sizes (capped at the data set's size) and, for
# W1 (full batch: its batch is its data set), the number of samples.
SWEEP = {"W1": [100, 1000, 10000], "batch": [16, 32, 64, 128, 256, 512, 1024, 4096]}
UNIT_LABELS = {"1000 epochs": "seconds per 1000-epoch fit", "epoch": "seconds per epoch"}


# --- data and initial weights --------------------------------------------------------------------------------
def make_data(name: str, samples: int | None = None, seed: int = 0):
    """(X float32 (n, n_in), y) for a workload: y is (n, 1) float32 for W1, int64 class ids otherwise."""
    spec = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    if name == "W1":
        n = samples or spec["samples"]
        X = np.linspace(-1, 1, n, dtype=np.float32).reshape(-1, 1)
        return X, (2 * X + rng.normal(size=X.shape)).astype(np.float32)
    n = samples or spec["samples"]
    n_in, k = spec["sizes"][0], spec["sizes"][-1]
    if name == "W2":
        try:
            from sklearn.datasets import load_digits

            digits = load_digits()
            order = np.random.default_rng(seed).permutation(len(digits.target))
            train = order[:int(0.75 * len(order))][:n]
            return (digits.data[train] / 16).astype(np.float32), digits.target[train].astype(np.int64)
        except ImportError:
            pass
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    teacher = rng.normal(size=(n_in, k))
    return X, np.argmax(X @ teacher, axis=1).astype(np.int64)


def linear_init(sizes, seed: int = 0):
    """PyTorch's nn.Linear initialisation (weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn with
    numpy, as float32 arrays in fastbp's orientation: weights[l] (n_in, n_out), biases[l] (n_out,)."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(n_in)
        weights.append(rng.uniform(-bound, bound, size=(n_in, n_out)).astype(np.float32))
        biases.append(rng.uniform(-bound, bound, size=n_out).astype(np.float32))
    return weights, biases


# --- the plain numpy reference (BLAS backprop) ---------------------------------------------------------------
class NumpyMLP:
    """Backprop with numpy's BLAS: the reference every device is compared with (float32, SGD)."""

    def __init__(self, sizes, activation: str, loss: str, weights, biases):
        self.activation, self.loss = activation, loss
        self.weights = [w.copy() for w in weights]
        self.biases = [b.copy() for b in biases]

    def step(self, X, Y, lr):
        """One SGD step on the batch X (B, n_in), Y (B, k) one-hot (softmax CE) or targets (mse)."""
        acts = [X]
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = acts[-1] @ w + b
            if layer < len(self.weights) - 1:
                z = np.maximum(z, 0) if self.activation == "relu" else 1 / (1 + np.exp(-z))
            acts.append(z)
        out = acts[-1]
        if self.loss == "mse":
            delta = (2.0 / out.size) * (out - Y)
        else:
            e = np.exp(out - out.max(axis=1, keepdims=True))
            delta = (e / e.sum(axis=1, keepdims=True) - Y) / X.shape[0]
        delta = delta.astype(np.float32)
        for layer in range(len(self.weights) - 1, -1, -1):
            dw = acts[layer].T @ delta
            db = delta.sum(axis=0)
            if layer > 0:
                a = acts[layer]
                delta = (delta @ self.weights[layer].T) * ((a > 0) if self.activation == "relu" else a * (1 - a))
            self.weights[layer] -= lr * dw
            self.biases[layer] -= lr * db

    def train(self, X, Y, batch_size, lr, epochs, rng):
        n = X.shape[0]
        lr = np.float32(lr)
        for _ in range(epochs):
            if batch_size is None or batch_size >= n:
                self.step(X, Y, lr)
                continue
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                self.step(X[idx], Y[idx], lr)


def one_hot(y, k):
    Y = np.zeros((len(y), k), dtype=np.float32)
    Y[np.arange(len(y)), y] = 1
    return Y


# --- timing --------------------------------------------------------------------------------------------------
def _median_time(run, repeats):
    run()  # warm-up: compilation, workspaces
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_fastbp(device, name, X, y, batch_size, repeats):
    import fastbp

    spec = WORKLOADS[name]
    weights, biases = linear_init(spec["sizes"])
    model = fastbp.MLP(spec["sizes"], spec["activation"], seed=0)
    for layer in range(len(weights)):
        model.weights[layer][...] = weights[layer]
        model.biases[layer][...] = biases[layer]
    trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=batch_size, device=device,
                             seed=0)
    return _median_time(lambda: trainer.fit(X, y, epochs=spec["epochs"]), repeats)


def time_numpy(name, X, y, batch_size, repeats):
    spec = WORKLOADS[name]
    weights, biases = linear_init(spec["sizes"])
    net = NumpyMLP(spec["sizes"], spec["activation"], spec["loss"], weights, biases)
    Y = y if spec["loss"] == "mse" else one_hot(y, spec["sizes"][-1])
    rng = np.random.default_rng(0)
    return _median_time(lambda: net.train(X, Y, batch_size, spec["lr"], spec["epochs"], rng), repeats)


def usable_devices(requested):
    """(devices to run, {device: why skipped})."""
    from .backends import cuda_unavailable_reason

    run, skipped = [], {}
    for device in requested:
        if device == "cuda":
            reason = cuda_unavailable_reason()
            if reason is not None:
                skipped["cuda"] = reason
                continue
        run.append(device)
    return run, skipped


def run_bench(workloads, devices, samples=None, batch_sizes=None, repeats=3, with_numpy=True, sweep=False):
    """Time every (device, workload, batch size); returns (rows, skipped). Each row is a dict with device,
    workload, batch_size, samples, unit, seconds (per timed unit), samples_per_s, vs_numpy, vs_cpu.
    sweep (without batch_sizes): the SWEEP sizes (W1: sample counts, each a full batch)."""
    devices, skipped = usable_devices(devices)
    rows = []
    for name in workloads:
        spec = WORKLOADS[name]
        if name == "W1" and sweep and not batch_sizes:
            data = [make_data(name, n) for n in SWEEP["W1"]]  # full batch: the batch grows with the data
            plan = [(X, y, None) for X, y in data]
        else:
            X, y = make_data(name, None if name == "W1" else samples)
            n = X.shape[0]
            sizes = batch_sizes or ([b for b in SWEEP["batch"] if b < n] + [n] if sweep else None)
            plan = [(X, y, b) for b in (sizes if sizes and name != "W1" else [spec["batch_size"]])]
        for X, y, batch_size in plan:
            n = X.shape[0]
            times = {}
            for device in devices:
                times[device] = time_fastbp(device, name, X, y, batch_size, repeats)
            if with_numpy:
                times["numpy"] = time_numpy(name, X, y, batch_size, repeats)
            for device, seconds in times.items():
                rows.append(dict(
                    device=device, workload=name, batch_size=batch_size or n, samples=n, unit=spec["unit"],
                    seconds=seconds, samples_per_s=n * spec["epochs"] / seconds,
                    vs_numpy=(times["numpy"] / seconds) if "numpy" in times else None,
                    vs_cpu=(times["cpu"] / seconds) if "cpu" in times else None))
    return rows, skipped


def format_table(rows) -> str:
    header = f"{'device':<7} {'workload':<8} {'batch':>6} {'time per unit':>16} {'samples/s':>12} " \
             f"{'vs numpy':>9} {'vs cpu':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        vs_numpy = f"{r['vs_numpy']:.2f}x" if r["vs_numpy"] is not None else "-"
        vs_cpu = f"{r['vs_cpu']:.2f}x" if r["vs_cpu"] is not None else "-"
        unit = f"{r['seconds'] * 1e3:.3f} ms/{'1000ep' if r['unit'] == '1000 epochs' else 'epoch'}"
        lines.append(f"{r['device']:<7} {r['workload']:<8} {r['batch_size']:>6} {unit:>16} "
                     f"{r['samples_per_s']:>12.4g} {vs_numpy:>9} {vs_cpu:>7}")
    return "\n".join(lines)


def plot(rows, path):
    """One panel per workload: its time per unit (UNIT_LABELS: W1's is a whole 1000-epoch fit) against batch
    size, one curve per device (fastbp.plotting.plot_timings); saved to ``path``. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import plot_timings

    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.5), squeeze=False)
    for ax, name in zip(axes[0], workloads):
        mine = [r for r in rows if r["workload"] == name]
        sizes = sorted({r["batch_size"] for r in mine})
        seconds = {device: [next((r["seconds"] for r in mine if r["device"] == device and r["batch_size"] == b),
                                 float("nan")) for b in sizes]
                   for device in sorted({r["device"] for r in mine})}
        plot_timings(sizes, seconds, ax, ylabel=UNIT_LABELS.get(mine[0]["unit"], mine[0]["unit"]), title=name)
        if name == "W1":
            ax.set_xlabel("batch size (= samples: full batch)")
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _csv(text, convert=str):
    return [convert(part) for part in text.split(",") if part.strip()]


# What --help and a loaded machine's run say about threads (issue 29: on a machine running other work, the W2
# epoch took 125 ms against numpy's 1.8 ms, 0.01x, on the omp layer; with OMP_WAIT_POLICY=PASSIVE 2.5 ms).
BUSY_MACHINE_NOTE = (
    "On a machine running other work, compare within one run. fastbp runs on numba's tbb threading layer where "
    "tbb is installed (a dependency on Linux x86-64; python -m fastbp info names the layer): its idle threads "
    "sleep. On the omp layer, OpenMP's threads spin while they wait and a parallel loop waits for its slowest "
    "thread: one W2 epoch measured 125 ms on a loaded 2-core machine against numpy's 1.8 ms, and 2.5 ms with "
    "OMP_WAIT_POLICY=PASSIVE; there, set OMP_WAIT_POLICY=PASSIVE before starting Python, or fewer threads with "
    "NUMBA_NUM_THREADS. On an idle machine the defaults are fastest.")


def _describe_workloads() -> str:
    lines = ["workloads (time per unit: W1 a whole 1000-epoch fit, W2-W4 one epoch):"]
    for name, spec in WORKLOADS.items():
        batch = "full batch" if spec["batch_size"] is None else f"batch {spec['batch_size']}"
        sizes = "-".join(map(str, spec["sizes"]))
        lines.append(f"  {name}  {sizes} {spec['activation']}, {spec['loss']}, {batch}, lr {spec['lr']}, "
                     f"{spec['samples']} samples")
    return "\n".join(lines)


def _loaded_machine() -> str | None:
    """A one-line warning when the 1-minute load average says other work is running, else None."""
    import os

    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):  # no load average on this platform
        return None
    if load < 0.5 * cpus:
        return None
    from ._threads import threading_layer

    policy = os.environ.get("OMP_WAIT_POLICY")
    advice = ("" if threading_layer() != "omp" or (policy and policy.upper() == "PASSIVE") else
              " Timings on a loaded machine vary widely; OMP_WAIT_POLICY=PASSIVE (set before Python starts) makes "
              "fastbp's waiting threads yield the cores (see --help).")
    return f"note: load average {load:.1f} on {cpus} logical CPUs: other work is running.{advice}"


def main(argv=None) -> int:
    sweep = ", ".join(map(str, SWEEP["batch"]))
    parser = argparse.ArgumentParser(
        prog="python -m fastbp bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the standard workloads W1-W4 on every usable device and on plain numpy.\n\n"
                    + _describe_workloads(),
        epilog=textwrap.fill("Times are medians over --repeats after a warm-up run (which compiles). "
                             + BUSY_MACHINE_NOTE, width=100))
    parser.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated subset of W1,W2,W3,W4")
    parser.add_argument("--samples", type=int, default=None, help="samples for W2-W4 (default: the full sizes)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes to sweep (W2-W4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda")
    parser.add_argument("--no-numpy", action="store_true", help="skip the numpy reference")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", nargs="?", const="bench.png", default=None, metavar="FILE.png",
                        help="draw time per unit against batch size, one curve per device (default file "
                             f"bench.png); without --batch-sizes it sweeps batch sizes {sweep} (up to the data "
                             f"set's size) and, for W1, {', '.join(map(str, SWEEP['W1']))} samples (a full batch)")
    args = parser.parse_args(argv)
    note = _loaded_machine()
    if note:
        print(note, file=sys.stderr)
    workloads = _csv(args.workloads, str.upper)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    batch_sizes = _csv(args.batch_sizes, int) if args.batch_sizes else None
    rows, skipped = run_bench(workloads, _csv(args.devices), args.samples, batch_sizes, args.repeats,
                              with_numpy=not args.no_numpy, sweep=bool(args.plot))
    if args.json:
        print(json.dumps({"rows": rows, "skipped": skipped}, indent=2))
    else:
        for device, reason in skipped.items():
            print(f"{device}: skipped ({reason})")
        print(format_table(rows))
    if args.plot:
        try:
            plot(rows, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
