"""The tutorial's linear regression, done right: Y = 2X + noise, fitted by a 1-16-1 network.

The tutorial's sample mixes up shapes (a (100,) target against a (100, 1) output broadcasts to (100, 100))
and its gradient (it drops the 2/n factor of the mean squared error and the sigmoid derivative). Here:
X = linspace(-1, 1, 100) as a (100, 1) column, Y = 2X + N(0, 1), sigmoid hidden layer, identity output,
MSE, full-batch gradient descent. Prints the loss every 100 epochs (after the fit), the predictions at -2, 0,
2 and the fitted slope over [-1, 1], and the time of the fit and of the predictions, each saying how much of
it was compiling. Under a second once the kernels are compiled; the first run on a machine compiles them
(fastbp prints a one-line notice while it does; the figures are in docs/performance.md).

    python examples/seed_regression.py [--epochs 3000] [--lr 0.1] [--device cpu]
"""
import argparse
import time

import numpy as np

import fastbp


def compile_note(compiled: float) -> str:
    """How much of a timing was compiling fastbp's kernels (``compiled``: seconds, from fastbp.compile_seconds)."""
    if compiled <= 0.0:
        return "nothing compiled: the kernels came from the cache"
    return f"of which {compiled:.1f} s compiling kernels, once per machine: later runs load them from the cache"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3000, help="full-batch epochs (default: 3000)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to train (default: cpu)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    X = np.linspace(-1, 1, 100, dtype=np.float32).reshape(-1, 1)
    Y = (2 * X + rng.normal(size=X.shape)).astype(np.float32)

    model = fastbp.MLP([1, 16, 1], activation="sigmoid", seed=0)
    trainer = fastbp.Trainer(model, loss="mse", optimizer="sgd", lr=args.lr, batch_size=None,
                             device=args.device, seed=0)
    started, compiled = time.perf_counter(), fastbp.compile_seconds()
    history = trainer.fit(X, Y, epochs=args.epochs)
    seconds, compiled = time.perf_counter() - started, fastbp.compile_seconds() - compiled
    for epoch in range(0, len(history.loss), 100):
        print(f"epoch {epoch:5d}  loss {history.loss[epoch]:.4f}")
    print(f"epoch {len(history.loss) - 1:5d}  loss {history.loss[-1]:.4f}")
    print(f"trained {args.epochs} epochs in {seconds:.3f} s on {trainer.device} ({compile_note(compiled)})",
          flush=True)
    started, compiled = time.perf_counter(), fastbp.compile_seconds()
    for x, p in zip([-2.0, 0.0, 2.0], trainer.predict(np.array([[-2.0], [0.0], [2.0]])).ravel()):
        print(f"prediction at x = {x:+.0f}: {p:+.3f}   (the line 2x: {2 * x:+.0f})")
    grid = np.linspace(-1, 1, 50).reshape(-1, 1)
    slope = np.polyfit(grid.ravel(), trainer.predict(grid).ravel(), 1)[0]
    seconds, compiled = time.perf_counter() - started, fastbp.compile_seconds() - compiled
    ls_slope = np.polyfit(X.ravel(), Y.ravel(), 1)[0]
    print(f"fitted slope over [-1, 1]: {slope:.3f} (least squares on this sample: {ls_slope:.3f}, truth: 2)")
    print(f"predictions in {seconds:.3f} s ({compile_note(compiled)})")
    return slope


if __name__ == "__main__":
    main()
