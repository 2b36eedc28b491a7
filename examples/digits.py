"""Handwritten digits (scikit-learn's bundled 8x8 set): a 64-128-10 relu network, softmax cross-entropy.

75/25 split, pixels scaled to [0, 1], SGD with batch 32 and lr 0.1 for 20 epochs; prints the loss and
held-out accuracy per epoch, the final test accuracy (about 97%) and the time, saying how much of it was
compiling. A second or two once the kernels are compiled; the first run on a machine compiles them (a
one-line notice on stderr says so; the figures are in docs/performance.md).

    python examples/digits.py [--epochs 20] [--device cpu]
"""
import argparse
import time

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastbp
from seed_regression import compile_note


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20, help="epochs (default: 20)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to train (default: cpu)")
    args = parser.parse_args(argv)

    digits = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.25,
                                                        random_state=0)
    model = fastbp.MLP([64, 128, 10], activation="relu", seed=0)
    trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer="sgd", lr=args.lr, batch_size=32,
                             device=args.device, seed=0)
    started, compiled = time.perf_counter(), fastbp.compile_seconds()
    history = trainer.fit(X_train, y_train, epochs=args.epochs, validation_data=(X_test, y_test))
    accuracy = trainer.evaluate(X_test, y_test)["accuracy"]
    seconds, compiled = time.perf_counter() - started, fastbp.compile_seconds() - compiled
    for epoch, (loss, acc) in enumerate(zip(history.loss, history.val_accuracy)):
        print(f"epoch {epoch:3d}  loss {loss:.4f}  test accuracy {acc:.3f}")
    print(f"test accuracy {accuracy:.4f} after {args.epochs} epochs, {seconds:.2f} s on {trainer.device} "
          f"({compile_note(compiled)})")
    return accuracy


if __name__ == "__main__":
    main()
