"""fastbp.sklearn.MLPClassifier against scikit-learn's own MLPClassifier: fit time and accuracy, same settings.

Two problems: scikit-learn's digits (1347 training rows x 64 pixels, 450 held out) and a synthetic
make_classification problem (20000 training rows x 100 features, 5 classes, 5000 held out). Both
estimators get the same settings: hidden_layer_sizes=(100,), solver="adam", batch_size=200, a fixed
max_iter, tol=0 and n_iter_no_change=inf so that both run every epoch, random_state=0; in float64 (input as
given: scikit-learn trains float64 input in float64, and so does fastbp) and in float32 (float32 input:
both train in float32). Each round fits scikit-learn's estimator, then fastbp's, in this one process
(alternating, so that the machine's load falls on both alike); the table shows the median fit time over the
rounds, the ratio scikit-learn / fastbp of each round (median; above 1: fastbp is faster) and the held-out
accuracy of the last round's fits. Compilation is done before the rounds (one warm-up fit each).

Both use the same number of threads (--threads, default: every CPU; fastbp's numba threads and
scikit-learn's BLAS threads). OMP_WAIT_POLICY defaults to PASSIVE here, as in examples/compare_peers.py: on a
machine shared with other jobs, OpenMP threads that spin while waiting for a descheduled partner made
fastbp's parallel kernels up to 40x slower in our runs.

Takes about 1-2 minutes on 2 CPU cores with the defaults; --quick (for CI: 1 round, few epochs, 4000
synthetic rows) takes about 10 seconds.

    python examples/sklearn_speed.py [--rounds 5] [--threads 2] [--quick] [--dtypes float64,float32]
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numba starts its OpenMP threads

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from sklearn.datasets import load_digits, make_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier as SklearnMLP  # noqa: E402

from fastbp.sklearn import MLPClassifier as FastbpMLP  # noqa: E402


def problems(quick: bool) -> dict:
    digits = load_digits()
    X, y = digits.data / 16.0, digits.target
    n_synthetic = 4000 if quick else 20000
    Xs, ys = make_classification(n_samples=n_synthetic * 5 // 4, n_features=100, n_informative=40, n_redundant=20,
                                 n_classes=5, n_clusters_per_class=2, random_state=0)
    return {"digits": (train_test_split(X, y, test_size=450, random_state=0), 5 if quick else 50),
            f"synthetic {n_synthetic} x 100": (train_test_split(Xs, ys, test_size=n_synthetic // 4, random_state=0),
                                               3 if quick else 20)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed_fit(estimator, X, y) -> float:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X, y)
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="CI smoke run: 1 round, few epochs, smaller data")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for each library")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--problems", default="digits,synthetic", help="comma-separated: digits, synthetic")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(limits=args.threads):
        return measure(args, rounds)


def measure(args, rounds: int) -> list:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {args.threads} thread(s) each; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; batch_size={args.batch_size}; "
          f"{rounds} alternating round(s)")
    print(f"{'problem':<24} {'dtype':<8} {'epochs':>6} {'scikit-learn':>13} {'fastbp':>10} {'ratio':>7} "
          f"{'acc sklearn':>11} {'acc fastbp':>10}")
    rows = []
    wanted = args.problems.split(",")
    for name, ((X_train, X_test, y_train, y_test), epochs) in problems(args.quick).items():
        if name.split()[0] not in wanted:
            continue
        for dtype in args.dtypes.split(","):
            Xtr, Xte = X_train.astype(dtype), X_test.astype(dtype)
            settings = dict(hidden_layer_sizes=(100,), solver="adam", batch_size=args.batch_size, max_iter=epochs,
                            tol=0.0, n_iter_no_change=np.inf, random_state=0)
            timed_fit(FastbpMLP(**(settings | {"max_iter": 1})), Xtr, y_train)  # compile (or load the cache)
            timed_fit(SklearnMLP(**(settings | {"max_iter": 1})), Xtr, y_train)
            times = {"sklearn": [], "fastbp": []}
            for _ in range(rounds):
                theirs, ours = SklearnMLP(**settings), FastbpMLP(**settings)
                times["sklearn"].append(timed_fit(theirs, Xtr, y_train))
                times["fastbp"].append(timed_fit(ours, Xtr, y_train))
            assert ours.n_iter_ == theirs.n_iter_ == epochs
            ratio = statistics.median(a / b for a, b in zip(times["sklearn"], times["fastbp"]))
            row = dict(problem=name, dtype=dtype, epochs=epochs, sklearn=statistics.median(times["sklearn"]),
                       fastbp=statistics.median(times["fastbp"]), ratio=ratio,
                       acc_sklearn=theirs.score(Xte, y_test), acc_fastbp=ours.score(Xte, y_test))
            rows.append(row)
            print(f"{name:<24} {dtype:<8} {epochs:>6} {row['sklearn']:>12.3f}s {row['fastbp']:>9.3f}s "
                  f"{ratio:>6.1f}x {row['acc_sklearn']:>11.4f} {row['acc_fastbp']:>10.4f}")
    return rows


if __name__ == "__main__":
    main()
