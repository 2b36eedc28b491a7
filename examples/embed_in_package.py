"""Using fastbp inside another package's function: warm-up at import, no global state.

`smooth(x, y)` below is what a library might export: it fits a small 1-32-32-1 tanh network to noisy
(x, y) points and returns the fitted values. Everything it needs (model, trainer) is created per call and
dropped afterwards, so calls are independent and share no mutable state. The only module-level
action is `_warm_up()`, which runs one tiny fit with the same loss, optimizer and dtype so numba compiles
(or loads from its disk cache) the kernels when the package is imported, not in the user's first call.
Prints the warm-up time, the first call's time and the fit's error. Takes a few seconds.

    python examples/embed_in_package.py [--points 200] [--epochs 500]
"""
import argparse
import time

import numpy as np

import fastbp

_SIZES = [1, 32, 32, 1]


def _new_trainer(seed: int) -> fastbp.Trainer:
    return fastbp.Trainer(fastbp.MLP(_SIZES, "tanh", dtype=np.float32, seed=seed), loss="mse", optimizer="adam",
                          lr=0.01, batch_size=None, seed=seed)


def _warm_up() -> float:
    """Compile (or load from the cache) exactly the kernels smooth() uses; returns the seconds it took."""
    started = time.perf_counter()
    x = np.zeros((4, 1), np.float32)
    trainer = _new_trainer(0)
    trainer.fit(x, x, epochs=1)
    trainer.predict(x)
    return time.perf_counter() - started


WARM_UP_SECONDS = _warm_up()  # at import of the embedding module


def smooth(x, y, *, epochs: int = 500, seed: int = 0) -> np.ndarray:
    """Fitted values of a small network trained on (x, y): a nonlinear smoother.

    Parameters
    ----------
    x, y : arrays (n,)
    epochs : int
    seed : int (weights and shuffling: the same inputs give the same output)

    Returns
    -------
    ndarray (n,), float64
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    scale = np.abs(x).max() or 1.0  # inputs to about [-1, 1]: what the network's initialisation expects
    X = (x / scale).reshape(-1, 1).astype(np.float32)
    trainer = _new_trainer(seed)
    trainer.fit(X, y.reshape(-1, 1).astype(np.float32), epochs=epochs)
    return trainer.predict(X).ravel().astype(np.float64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=500)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    x = np.linspace(-3, 3, args.points)
    truth = np.sin(x)
    y = truth + rng.normal(scale=0.3, size=x.shape)
    started = time.perf_counter()
    fitted = smooth(x, y, epochs=args.epochs)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    again = smooth(x, y, epochs=args.epochs)
    seconds_again = time.perf_counter() - started
    rmse = float(np.sqrt(np.mean((fitted - truth) ** 2)))
    print(f"warm-up at import: {WARM_UP_SECONDS:.2f} s; first smooth() call: {seconds:.3f} s, "
          f"second: {seconds_again:.3f} s")
    print(f"RMSE against the noise-free curve: {rmse:.3f} (noise sd 0.3); "
          f"repeatable: {np.array_equal(fitted, again)}")
    return rmse


if __name__ == "__main__":
    main()
