"""A hyper-parameter sweep with scikit-learn's GridSearchCV over fastbp.sklearn.MLPClassifier, in parallel.

fastbp's estimators pickle, train in worker processes and share nothing with the parent (no threads, no
open handles, no global state beyond numba's on-disk cache), so ``GridSearchCV(n_jobs=...)`` runs them in
separate processes. On one machine that is joblib's default process backend, loky (this example). On a
cluster, the same code runs on Dask or Ray workers by changing the joblib backend only::

    # Dask: start a scheduler and workers (dask-scheduler; dask-worker tcp://host:8786 --nthreads 1
    # --nworkers <cores>), install fastbp on every worker, then:
    from dask.distributed import Client
    import joblib
    client = Client("tcp://host:8786")
    with joblib.parallel_config(backend="dask"):
        search.fit(X, y)

    # Ray: ray.init(address="auto"); from ray.util.joblib import register_ray; register_ray()
    #      with joblib.parallel_config(backend="ray"): search.fit(X, y)

Give each worker its share of cores: fastbp's kernels use NUMBA_NUM_THREADS threads (default: all cores),
so n_jobs workers on C cores should each get C // n_jobs (set here before the workers start; with Dask use
one thread per worker process, ``--nthreads 1``, and set NUMBA_NUM_THREADS in the workers' environment).
Each worker compiles the kernels once, or loads them from numba's cache (NUMBA_CACHE_DIR, on a shared or a
local disk).

    python examples/sweep.py                 # digits, 4 settings x 3 folds on 2 processes: about 1 min cold
    python examples/sweep.py --backend dask --scheduler tcp://host:8786
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--backend", default="loky", choices=["loky", "dask"])
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address (with --backend dask)")
    args = parser.parse_args()
    # Before any worker starts: workers inherit the environment.
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.n_jobs)))

    import joblib
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV, train_test_split

    try:
        from fastbp.sklearn import MLPClassifier
    except ImportError as error:
        raise SystemExit(f"this example needs fastbp.sklearn (scikit-learn estimators): {error}") from error

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, random_state=0)
    search = GridSearchCV(
        MLPClassifier(batch_size=32, max_iter=args.max_iter, random_state=0),
        param_grid={"hidden_layer_sizes": [(64,), (128,)], "learning_rate_init": [0.001, 0.01]},
        cv=3, n_jobs=args.n_jobs)
    if args.backend == "dask":
        from dask.distributed import Client

        client = Client(args.scheduler)  # noqa: F841 - registers itself as joblib's "dask" backend
    started = time.perf_counter()
    with joblib.parallel_config(backend=args.backend):
        search.fit(X_train, y_train)
    print(f"{len(search.cv_results_['params'])} settings x 3 folds on {args.n_jobs} {args.backend} workers: "
          f"{time.perf_counter() - started:.1f} s")
    for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
        print(f"  {params}: cross-validated accuracy {score:.4f}")
    print(f"best {search.best_params_}; test accuracy {search.score(X_test, y_test):.4f}")


if __name__ == "__main__":
    main()
