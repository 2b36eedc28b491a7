"""The foundation of parameter sweeps on a cluster: a Trainer and its MLP pickle, train in a worker process
(joblib's loky backend, as GridSearchCV(n_jobs=...) uses) and come back; nothing is shared with the parent.
Also: ``import fastbp`` does not need mpi4py."""
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastbp


def _problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    return X, (X[:, 0] + X[:, 1] > 0).astype(np.int64)


def _train(trainer, X, y, epochs):
    history = trainer.fit(X, y, epochs=epochs)
    return trainer, history.loss


def test_trainer_pickles_and_trains_the_same_after_a_round_trip():
    X, y = _problem()
    trainer = fastbp.Trainer(fastbp.MLP([6, 8, 2], seed=0), loss="softmax_cross_entropy", lr=0.1, batch_size=16,
                             seed=0)
    trainer.fit(X, y, epochs=1)  # workspaces and RNG state exist and must survive pickling
    clone = pickle.loads(pickle.dumps(trainer))
    loss = trainer.fit(X, y, epochs=2).loss
    loss_clone = clone.fit(X, y, epochs=2).loss
    assert loss == loss_clone
    np.testing.assert_array_equal(trainer.model.weights[0], clone.model.weights[0])


def test_trainers_train_in_loky_worker_processes():
    joblib = pytest.importorskip("joblib")
    X, y = _problem()
    trainers = [fastbp.Trainer(fastbp.MLP([6, 8, 2], seed=0), loss="softmax_cross_entropy", lr=lr,
                               batch_size=16, seed=0) for lr in (0.03, 0.1)]
    results = joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(_train)(t, X, y, 3) for t in trainers)
    for (trained, losses), original in zip(results, trainers):
        local = fastbp.Trainer(fastbp.MLP([6, 8, 2], seed=0), loss="softmax_cross_entropy", lr=original.lr,
                               batch_size=16, seed=0)
        assert losses == local.fit(X, y, epochs=3).loss  # a worker trains exactly as this process does
        np.testing.assert_array_equal(trained.model.weights[1], local.model.weights[1])
        assert original.epochs_done == 0  # the parent's copy was not touched: nothing is shared


def test_import_fastbp_does_not_import_mpi4py():
    code = ("import sys, fastbp, fastbp.distributed; "
            "assert 'mpi4py' not in sys.modules, sorted(m for m in sys.modules if 'mpi' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sweep_example_runs_on_loky_workers():
    """examples/sweep.py: GridSearchCV(n_jobs=2) over fastbp.sklearn.MLPClassifier on loky workers."""
    from pathlib import Path

    estimators = pytest.importorskip("fastbp.sklearn")
    if Path(estimators.__file__).parent != Path(fastbp.__file__).parent:  # an editable install elsewhere
        pytest.skip("fastbp.sklearn comes from another fastbp checkout than the fastbp under test")

    script = Path(__file__).parents[1] / "examples" / "sweep.py"
    run = subprocess.run([sys.executable, str(script), "--n-jobs", "2", "--max-iter", "2"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "best {" in run.stdout


def _sweep_scores(backend: str, tmp_path) -> list:
    """Every split's accuracy and log-loss from examples/sweep.py on ``backend``, through its --json output."""
    import json
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "sweep.py"
    out = tmp_path / f"{backend}.json"
    run = subprocess.run([sys.executable, "-W", "ignore", str(script), "--backend", backend, "--n-jobs", "2",
                          "--max-iter", "2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["split_scores"]


@pytest.mark.parametrize("backend", ["dask", "ray"])
def test_sweep_example_gives_loky_scores_on_dask_and_ray(backend, tmp_path):
    """The same GridSearchCV on a Dask LocalCluster / a local Ray instance: every split's scores equal loky's
    bit for bit (the log-loss is continuous, so a difference in any fit would show). Needs the dask or ray
    extra; CI runs the Dask case in .ci/steps/dask.sh."""
    estimators = pytest.importorskip("fastbp.sklearn")
    pytest.importorskip("distributed" if backend == "dask" else "ray.util.joblib")
    from pathlib import Path

    if Path(estimators.__file__).parent != Path(fastbp.__file__).parent:
        pytest.skip("fastbp.sklearn comes from another fastbp checkout than the fastbp under test")
    loky = _sweep_scores("loky", tmp_path)
    assert len(loky) == 4 and all(len(row) == 6 for row in loky)
    assert _sweep_scores(backend, tmp_path) == loky


def test_no_example_shadows_an_importable_module():
    """A script run as ``python examples/x.py`` puts examples/ first on sys.path, so an example named like a
    module hides it from every script there: examples/distributed.py once hid dask's ``distributed`` package
    and broke ``sweep.py --backend dask``. The example names must be neither standard-library modules nor the
    top-level modules of any installed distribution, nor the packages the sweep and MPI recipes import."""
    from importlib.metadata import packages_distributions
    from pathlib import Path

    recipes = {"distributed", "dask", "ray", "joblib", "sklearn", "mpi4py", "numba", "numpy", "fastbp"}
    taken = set(sys.stdlib_module_names) | set(packages_distributions()) | recipes
    examples = sorted(p.stem for p in (Path(__file__).parents[1] / "examples").glob("*.py"))
    assert examples, "no examples found"
    shadowing = [name for name in examples if name in taken]
    assert not shadowing, f"examples named like importable modules: {shadowing}"
