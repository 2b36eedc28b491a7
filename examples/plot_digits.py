"""Digits with pictures: fastbp's scikit-learn MLPClassifier, its loss curve and a confusion matrix.

Fits fastbp.sklearn.MLPClassifier (64-128-10, relu, adam) with early stopping on scikit-learn's 8x8 digits
(75/25 split, pixels scaled to [0, 1]) and saves digits_loss.png (training loss and validation accuracy
per epoch) and digits_confusion.png (test set) into --out. Prints the test accuracy (94-97%).
Takes about 30 s the first time (compilation), a few seconds after that.

    python examples/plot_digits.py [--max-iter 100] [--out DIR] [--device cpu]
"""
import argparse
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from fastbp.plotting import plot_confusion_matrix, plot_history  # noqa: E402
from fastbp.sklearn import MLPClassifier  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fastbp-examples"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    digits = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(digits.data / 16.0, digits.target, test_size=0.25,
                                                        random_state=0)
    clf = MLPClassifier(hidden_layer_sizes=(128,), learning_rate_init=0.003, max_iter=args.max_iter,
                        early_stopping=True, n_iter_no_change=10, random_state=0, device=args.device)
    clf.fit(X_train, y_train)
    accuracy = clf.score(X_test, y_test)

    fig, ax = plt.subplots(figsize=(6, 4))
    plot_history(clf, ax=ax, title=f"Digits: {clf.n_iter_} epochs (early stopping)")
    loss_path = os.path.join(args.out, "digits_loss.png")
    fig.savefig(loss_path, dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    plot_confusion_matrix(y_test, clf.predict(X_test), ax=ax, title=f"Digits test set: accuracy {accuracy:.3f}")
    confusion_path = os.path.join(args.out, "digits_confusion.png")
    fig.savefig(confusion_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"test accuracy {accuracy:.4f} after {clf.n_iter_} epochs")
    print("wrote", loss_path)
    print("wrote", confusion_path)
    return accuracy


if __name__ == "__main__":
    main()
