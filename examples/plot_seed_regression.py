"""Pictures of the seed regression: the fitted curve over the data (Y = 2X + noise) and the loss per epoch.

Trains the 1-16-1 sigmoid network of seed_regression.py (MSE, full batch, 20% of the points held out for a
validation curve) and saves seed_regression_fit.png and seed_regression_loss.png into --out. Takes about
20 s the first time (compilation), a second after that.

    python examples/plot_seed_regression.py [--epochs 3000] [--out DIR] [--device cpu]
"""
import argparse
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import fastbp  # noqa: E402
from fastbp.plotting import plot_fit_1d, plot_history  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fastbp-examples"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(0)
    X = np.linspace(-1, 1, 100, dtype=np.float32).reshape(-1, 1)
    Y = (2 * X + rng.normal(size=X.shape)).astype(np.float32)
    held_out = rng.permutation(100)[:20]
    train = np.setdiff1d(np.arange(100), held_out)

    trainer = fastbp.Trainer(fastbp.MLP([1, 16, 1], activation="sigmoid", seed=0), loss="mse", optimizer="sgd",
                             lr=args.lr, batch_size=None, device=args.device, seed=0)
    history = trainer.fit(X[train], Y[train], epochs=args.epochs, validation_data=(X[held_out], Y[held_out]))

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_fit_1d(trainer.predict, X, Y, ax=ax, reference=lambda x: 2 * x,
                title=f"1-16-1 sigmoid network after {len(history.loss)} epochs")
    paths.append(os.path.join(args.out, "seed_regression_fit.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_history(history, ax=ax, title="Seed regression: MSE per epoch")
    paths.append(os.path.join(args.out, "seed_regression_loss.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"final train loss {history.loss[-1]:.4f}, validation loss {history.val_loss[-1]:.4f}")
    for path in paths:
        print("wrote", path)
    return paths


if __name__ == "__main__":
    main()
