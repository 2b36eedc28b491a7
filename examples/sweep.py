"""A hyper-parameter sweep with scikit-learn's GridSearchCV over fastbp.sklearn.MLPClassifier, in parallel on
joblib's loky processes (one machine), a Dask cluster or a Ray cluster: only the joblib backend changes.

fastbp's estimators pickle, train in worker processes and share nothing with the parent (no threads, no open
handles, no global state beyond numba's on-disk cache), so every backend gives the same cross-validation
scores, bit for bit (CI checks Dask's LocalCluster against loky). The recipes for a real cluster (a
scheduler and workers started with ``dask scheduler`` / ``dask worker``, a Ray cluster, warming the kernel
cache on the workers) are in docs/scale-out.md.

    python examples/sweep.py                                   # loky: 2 processes on this machine
    python examples/sweep.py --backend dask                    # a Dask LocalCluster of 2 worker processes
    python examples/sweep.py --backend dask --scheduler tcp://host:8786   # an existing Dask cluster
    python examples/sweep.py --backend ray                     # a local Ray instance with 2 CPUs
    python examples/sweep.py --backend ray --address auto      # an existing Ray cluster (ray start --head)
    python examples/sweep.py --json scores.json                # also write every split's scores

Digits (1,347 training rows), 4 settings x 3 folds, max_iter 10: a few seconds once the kernels are in the
numba cache; each new worker process that finds no cache compiles them first (see docs/scale-out.md).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-jobs", type=int, default=2, help="parallel fits (and LocalCluster / local Ray size)")
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--backend", default="loky", choices=["loky", "dask", "ray"])
    parser.add_argument("--scheduler", default=None,
                        help="Dask scheduler address (tcp://host:8786); default: start a LocalCluster here")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address ('auto' or host:6379); default: start a local Ray instance")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write every setting's per-split scores (full precision) to PATH")
    args = parser.parse_args()
    if args.n_jobs < 1:
        parser.error(f"--n-jobs must be >= 1; got {args.n_jobs}")
    if args.scheduler and args.backend != "dask":
        parser.error("--scheduler is for --backend dask")
    if args.address and args.backend != "ray":
        parser.error("--address is for --backend ray")
    # Each worker's share of the cores (fastbp's kernels use NUMBA_NUM_THREADS threads, default: all cores).
    # Set before any local worker starts: loky workers and a LocalCluster inherit the environment.
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
    # Two scores: accuracy (what refit chooses by) and the log-loss, a continuous score that shows any
    # difference between backends that accuracy would round away.
    search = GridSearchCV(
        MLPClassifier(batch_size=32, max_iter=args.max_iter, random_state=0),
        param_grid={"hidden_layer_sizes": [(64,), (128,)], "learning_rate_init": [0.001, 0.01]},
        scoring={"accuracy": "accuracy", "neg_log_loss": "neg_log_loss"}, refit="accuracy", cv=3,
        n_jobs=args.n_jobs)

    cleanup = []
    if args.backend == "dask":
        from dask.distributed import Client, LocalCluster

        if args.scheduler:
            client = Client(args.scheduler)  # registers itself as joblib's "dask" backend
        else:  # one single-threaded worker process per job: numba's threads are the parallelism inside a fit
            cluster = LocalCluster(n_workers=args.n_jobs, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
            cleanup.append(cluster.close)
        cleanup.insert(0, client.close)
        where = f"Dask ({len(client.scheduler_info()['workers'])} workers)"
    elif args.backend == "ray":
        import ray
        from ray.util.joblib import register_ray

        if args.address:
            ray.init(address=args.address)
        else:  # the workers get this process's fastbp settings (thread count, kernel cache)
            env = {k: os.environ[k] for k in ("NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR") if k in os.environ}
            ray.init(num_cpus=args.n_jobs, include_dashboard=False, runtime_env={"env_vars": env})
        register_ray()
        cleanup.append(ray.shutdown)
        where = f"Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
    else:
        where = f"loky ({args.n_jobs} processes)"

    try:
        started = time.perf_counter()
        with joblib.parallel_config(backend=args.backend):
            search.fit(X_train, y_train)
        seconds = time.perf_counter() - started
    finally:
        for close in cleanup:
            close()

    results = search.cv_results_
    print(f"{len(results['params'])} settings x 3 folds on {where}: {seconds:.1f} s")
    for i, params in enumerate(results["params"]):
        print(f"  {params}: accuracy {results['mean_test_accuracy'][i]:.4f}, "
              f"log-loss {-results['mean_test_neg_log_loss'][i]:.6f}")
    print(f"best {search.best_params_}; test accuracy {search.score(X_test, y_test):.4f}")
    if args.json:
        splits = [[float(results[f"split{k}_test_{name}"][i]) for name in ("accuracy", "neg_log_loss")
                   for k in range(3)] for i in range(len(results["params"]))]
        with open(args.json, "w") as file:
            json.dump({"backend": args.backend, "params": [str(p) for p in results["params"]],
                       "split_scores": splits, "best_params": str(search.best_params_)}, file, indent=1)


if __name__ == "__main__":
    main()
