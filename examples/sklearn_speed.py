"""fastbp.sklearn.MLPClassifier against scikit-learn's own MLPClassifier: fit time and accuracy, same settings.

The two problems of issue 27: scikit-learn's digits (1347 training rows x 64 pixels, 450 held out) and a
synthetic make_classification problem (15000 training rows x 100 features, 5 classes, 3750 held out). Both
estimators get the same settings: hidden_layer_sizes=(128,), solver="adam", batch_size="auto" (200 rows),
30 epochs with tol=0 and n_iter_no_change=inf so that both run every epoch, random_state=0; in float64 (input
as given: scikit-learn trains float64 input in float64, and so does fastbp) and in float32 (float32 input:
both train in float32). Each round fits scikit-learn's estimator, then fastbp's, then ``fastbp.Trainer`` with
the estimator's own settings (``_trainer_settings_``) on the same rows, in this one process (alternating, so
that the machine's load falls on all alike, each after a pause that lets the previous fit's idle threads go
to sleep); the table shows the median fit times over the rounds, the ratio
scikit-learn / fastbp of each round (median; above 1: fastbp is faster), the estimator's share of its time
that is not the Trainer's epochs ("overhead"), and the held-out accuracy of the last round's fits, with a
mark where they differ by more than 1.5 points. Compilation is done before the rounds (one warm-up fit each).

Both use the same number of threads (--threads, default: every CPU; fastbp's numba threads and
scikit-learn's BLAS threads). OMP_WAIT_POLICY defaults to PASSIVE here, as in examples/compare_peers.py: on a
machine shared with other jobs, OpenMP threads that spin while waiting for a descheduled partner made
fastbp's parallel kernels up to 40x slower in our runs (on numba's omp layer; fastbp's default where tbb is
installed is numba's tbb layer, whose idle threads sleep, and the setting still calms other OpenMP users).
Do not set OMP_WAIT_POLICY=ACTIVE here: numba's idle OpenMP threads then spin without end and take a core
from scikit-learn's BLAS threads in this same process (its fits became 3-12x slower in our runs).

Takes about 1-2 minutes on 2 CPU cores with the defaults; --quick (1 round, few epochs, 4000 synthetic rows)
takes about 10 seconds.

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

import fastbp  # noqa: E402
from fastbp.sklearn import MLPClassifier as FastbpMLP  # noqa: E402


def problems(quick: bool) -> dict:
    """{name: ((X_train, X_test, y_train, y_test), epochs)}."""
    digits = load_digits()
    X, y = digits.data / 16.0, digits.target
    n_synthetic = 4000 if quick else 15000
    Xs, ys = make_classification(n_samples=n_synthetic * 5 // 4, n_features=100, n_informative=40, n_redundant=20,
                                 n_classes=5, n_clusters_per_class=2, random_state=0)
    epochs = 5 if quick else 30
    return {"digits": (train_test_split(X, y, test_size=450, random_state=0), epochs),
            f"synthetic {n_synthetic} x 100": (train_test_split(Xs, ys, test_size=n_synthetic // 4, random_state=0),
                                               epochs)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# Seconds to wait before each timed fit: after its last call, a library's idle threads spin for a while before
# they sleep (OpenBLAS's about 50 ms: fastbp/_blas_free.py), holding a core that the next fit, timed here,
# needs. Without the pause each library's fit would pay for the previous one's threads.
SETTLE_SECONDS = 0.3


def timed_fit(estimator, X, y) -> float:
    time.sleep(SETTLE_SECONDS)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(X, y)
    return time.perf_counter() - started


def timed_trainer_fit(fitted, X, y, epochs: int) -> float:
    """The estimator's epochs through fastbp.Trainer alone: a new model of the same architecture, the fitted
    estimator's Trainer settings, the same rows and targets (one-hot), the same number of epochs."""
    model = fastbp.MLP([X.shape[1], *fitted.hidden_layer_sizes, fitted.n_outputs_], "relu",
                       dtype=fitted.model_.dtype, seed=0)
    targets = fitted._label_binarizer.transform(y).astype(fitted.model_.dtype)
    trainer = fastbp.Trainer(model, **fitted._trainer_settings_)
    time.sleep(SETTLE_SECONDS)
    started = time.perf_counter()
    trainer.fit(X, targets, epochs=epochs)
    return time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, few epochs, smaller data")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for each library")
    parser.add_argument("--batch-size", default="auto", help='"auto" (min(200, n_samples)) or a number of rows')
    parser.add_argument("--problems", default="digits,synthetic", help="comma-separated: digits, synthetic")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    rounds = 1 if args.quick else args.rounds
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(limits=args.threads):
        return measure(args, rounds)


def measure(args, rounds: int) -> list:
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; {args.threads} thread(s) each; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; batch_size={args.batch_size}; "
          f"{rounds} alternating round(s)")
    print(f"{'problem':<24} {'dtype':<8} {'epochs':>6} {'scikit-learn':>13} {'fastbp':>10} {'Trainer':>9} "
          f"{'ratio':>7} {'overhead':>8} {'acc sklearn':>11} {'acc fastbp':>10}")
    rows = []
    wanted = args.problems.split(",")
    for name, ((X_train, X_test, y_train, y_test), epochs) in problems(args.quick).items():
        if name.split()[0] not in wanted:
            continue
        for dtype in args.dtypes.split(","):
            Xtr, Xte = X_train.astype(dtype), X_test.astype(dtype)
            settings = dict(hidden_layer_sizes=(128,), solver="adam", batch_size=args.batch_size, max_iter=epochs,
                            tol=0.0, n_iter_no_change=np.inf, random_state=0)
            warm = FastbpMLP(**(settings | {"max_iter": 1}))
            timed_fit(warm, Xtr, y_train)  # compile (or load the cache)
            timed_trainer_fit(warm, Xtr, y_train, 1)
            timed_fit(SklearnMLP(**(settings | {"max_iter": 1})), Xtr, y_train)
            times = {"sklearn": [], "fastbp": [], "trainer": []}
            for _ in range(rounds):
                theirs, ours = SklearnMLP(**settings), FastbpMLP(**settings)
                times["sklearn"].append(timed_fit(theirs, Xtr, y_train))
                times["fastbp"].append(timed_fit(ours, Xtr, y_train))
                times["trainer"].append(timed_trainer_fit(ours, Xtr, y_train, epochs))
            assert ours.n_iter_ == theirs.n_iter_ == epochs
            ratio = statistics.median(a / b for a, b in zip(times["sklearn"], times["fastbp"]))
            overhead = statistics.median(1 - t / f for t, f in zip(times["trainer"], times["fastbp"]))
            row = dict(problem=name, dtype=dtype, epochs=epochs, sklearn=statistics.median(times["sklearn"]),
                       fastbp=statistics.median(times["fastbp"]), trainer=statistics.median(times["trainer"]),
                       ratio=ratio, overhead=overhead, acc_sklearn=theirs.score(Xte, y_test),
                       acc_fastbp=ours.score(Xte, y_test))
            rows.append(row)
            mark = "  (accuracies differ by more than 1.5 points)" if abs(
                row["acc_sklearn"] - row["acc_fastbp"]) > 0.015 else ""
            print(f"{name:<24} {dtype:<8} {epochs:>6} {row['sklearn']:>12.3f}s {row['fastbp']:>9.3f}s "
                  f"{row['trainer']:>8.3f}s {ratio:>6.1f}x {overhead:>7.0%} {row['acc_sklearn']:>11.4f} "
                  f"{row['acc_fastbp']:>10.4f}{mark}", flush=True)
    return rows


if __name__ == "__main__":
    main()
