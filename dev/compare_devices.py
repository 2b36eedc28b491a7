"""Time fastbp's CPU and CUDA targets on the standard workloads and print a table.

    python -m dev.compare_devices [--workloads W1 W2 W3 W4] [--repeats 3] [--quick]

The workloads are the project's (see the benchmarks): W1 seed regression (1-16-1 sigmoid, full batch,
1000 epochs), W2 digits (64-128-10 relu, batch 32, one epoch), W3 MNIST-sized (784-256-256-10 relu,
60000 samples, batch 128, one epoch), W4 wide (1024-1024-1024-10 relu, 16384 samples, batch 512, one
epoch). float32, SGD, the same initial weights and seed on both devices. Each time is the median of
``--repeats`` calls after one warm-up call (JIT compilation excluded). On the GPU the training data is
uploaded once beforehand (it stays resident, as in a real fit), and every timed call ends with the
parameters copied back to the host, so the time includes all the device work. ``--quick`` shrinks W3 and
W4 to a tenth of their samples. Also checks that the two devices reach the same loss (relative difference
shown). Without a usable GPU it times the CPU only and says why.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import fastbp
from fastbp.backends import cuda_unavailable_reason


def _teacher(n, n_in, k, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    labels = (X @ rng.normal(size=(n_in, k))).argmax(axis=1)
    return X, labels


def workloads(quick: bool):
    scale = 10 if quick else 1
    X1 = np.linspace(-1, 1, 100, dtype=np.float32).reshape(-1, 1)
    y1 = (2 * X1 + np.random.default_rng(0).normal(size=X1.shape)).astype(np.float32)
    yield "W1", "seed regression 1-16-1, full batch, 1000 epochs", dict(
        sizes=[1, 16, 1], act="sigmoid", loss="mse", lr=0.01, batch_size=None, epochs=1000, data=lambda: (X1, y1))

    def digits():
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16).astype(np.float32)[:1347], d.target[:1347]

    yield "W2", "digits 64-128-10, batch 32, 1 epoch", dict(
        sizes=[64, 128, 10], act="relu", loss="softmax_cross_entropy", lr=0.1, batch_size=32, epochs=1, data=digits)
    yield "W3", f"{60000 // scale} x 784, 784-256-256-10, batch 128, 1 epoch", dict(
        sizes=[784, 256, 256, 10], act="relu", loss="softmax_cross_entropy", lr=0.05, batch_size=128, epochs=1,
        data=lambda: _teacher(60000 // scale, 784, 10, 3))
    yield "W4", f"{16384 // scale} x 1024, 1024-1024-1024-10, batch 512, 1 epoch", dict(
        sizes=[1024, 1024, 1024, 10], act="relu", loss="softmax_cross_entropy", lr=0.05, batch_size=512,
        epochs=1, data=lambda: _teacher(16384 // scale, 1024, 10, 4))


def time_device(device, spec, X, y, repeats):
    model = fastbp.MLP(spec["sizes"], spec["act"], dtype=np.float32, seed=0)
    trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=spec["batch_size"],
                             device=device, seed=0)
    if device == "cuda":  # resident data: uploaded once, used in place by every fit
        from fastbp.kernels import cuda as kernels

        if spec["loss"] == "softmax_cross_entropy":
            y = np.eye(spec["sizes"][-1], dtype=np.float32)[y]
        X, y = kernels.to_device(X), kernels.to_device(np.ascontiguousarray(y, dtype=np.float32))
    initial = model.flat_parameters().copy()
    times, losses = [], None
    for rep in range(repeats + 1):
        model.set_flat_parameters(initial)
        started = time.perf_counter()
        history = trainer.fit(X, y, epochs=spec["epochs"])  # ends with the parameters copied to the host
        elapsed = time.perf_counter() - started
        if rep:  # the first call compiles
            times.append(elapsed)
        losses = history.loss[-1]
    return statistics.median(times), losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="W3 and W4 with a tenth of the samples")
    args = parser.parse_args(argv)
    reason = cuda_unavailable_reason()
    devices = ["cpu"] if reason else ["cpu", "cuda"]
    if reason:
        print(f"CUDA not timed: {reason}")
    header = f"{'workload':<4} {'what':<48} {'cpu s':>9} {'cuda s':>9} {'speed-up':>9} {'loss rel diff':>14}"
    print(header)
    print("-" * len(header))
    for name, what, spec in workloads(args.quick):
        if name not in args.workloads:
            continue
        X, y = spec["data"]()
        results = {device: time_device(device, spec, X, y, args.repeats) for device in devices}
        cpu_t, cpu_loss = results["cpu"]
        if "cuda" in results:
            gpu_t, gpu_loss = results["cuda"]
            diff = abs(gpu_loss - cpu_loss) / max(abs(cpu_loss), 1e-30)
            print(f"{name:<4} {what:<48} {cpu_t:>9.4f} {gpu_t:>9.4f} {cpu_t / gpu_t:>8.2f}x {diff:>14.2e}",
                  flush=True)
        else:
            print(f"{name:<4} {what:<48} {cpu_t:>9.4f} {'-':>9} {'-':>9} {'-':>14}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
