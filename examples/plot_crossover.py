"""Where does the GPU overtake the CPU? Seconds per epoch against batch size, one line per usable device.

Trains a 784-128-128-10 relu network (--hidden) (softmax cross-entropy, SGD) on random data for a few epochs at
each batch size on every usable device (the CPU always; CUDA when `python -m fastbp info` says it is
usable), after one warm-up fit per device so compilation is not timed, and saves crossover.png into
--out. Without a GPU it shows the CPU curve alone. The full, asv-backed comparison is
`python -m fastbp bench` where installed. Takes 10-60 s.

    python examples/plot_crossover.py [--samples 2048] [--epochs 2] [--batch-sizes 32 128 512 2048] [--out DIR]
"""
import argparse
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import fastbp  # noqa: E402
from fastbp.backends import cuda_unavailable_reason  # noqa: E402
from fastbp.plotting import plot_timings  # noqa: E402


def seconds_per_epoch(device: str, X, y, sizes, batch_size: int, epochs: int) -> float:
    trainer = fastbp.Trainer(fastbp.MLP(sizes, "relu", seed=0), loss="softmax_cross_entropy", lr=0.01,
                             batch_size=batch_size, device=device, seed=0)
    trainer.fit(X[:batch_size], y[:batch_size], epochs=1)  # warm-up: compilation, workspaces, transfers
    started = time.perf_counter()
    trainer.fit(X, y, epochs=epochs)
    return (time.perf_counter() - started) / epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fastbp-examples"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.samples, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=args.samples)
    sizes = [784, args.hidden, args.hidden, 10]
    devices = ["cpu"]
    reason = cuda_unavailable_reason()
    if reason is None:
        devices.append("cuda")
    else:
        print(f"CUDA not usable ({reason}): timing the CPU only")
    timings = {device: [] for device in devices}
    for batch_size in args.batch_sizes:
        for device in devices:
            timings[device].append(seconds_per_epoch(device, X, y, sizes, batch_size, args.epochs))
        print(f"batch {batch_size:5d}  " + "  ".join(f"{d} {timings[d][-1] * 1e3:8.1f} ms/epoch" for d in devices))

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_timings(args.batch_sizes, timings, ax=ax,
                 title=f"{'-'.join(map(str, sizes))} relu, {args.samples} samples: time per epoch")
    path = os.path.join(args.out, "crossover.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("wrote", path)
    return timings


if __name__ == "__main__":
    main()
