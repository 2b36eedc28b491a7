"""fastbp.sklearn: scikit-learn's estimator contract (check_estimator), Pipeline, GridSearchCV, pickling,
joblib workers, early stopping, and accuracy comparable to scikit-learn's own MLPClassifier on digits."""
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits, load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from fastbp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# check_estimator fits many times: small networks and few epochs keep it fast.
_CHECKED = [MLPClassifier(hidden_layer_sizes=(8,), learning_rate_init=0.01, max_iter=50, random_state=0),
            MLPRegressor(hidden_layer_sizes=(8,), learning_rate_init=0.01, max_iter=50, random_state=0)]

# Checks we expect to fail, and why (scikit-learn reports them as xfail): none. The sample-weight checks
# (equivalence with repeated rows, weights not overwritten, one label) pass since Trainer.fit takes weights.
EXPECTED_FAILED = {"MLPClassifier": {}, "MLPRegressor": {}}


def _expected_failed(estimator):
    return EXPECTED_FAILED[type(estimator).__name__]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


@parametrize_with_checks(_CHECKED, expected_failed_checks=_expected_failed)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.25, random_state=0)


def test_importing_fastbp_does_not_import_sklearn():
    code = "import sys, fastbp; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("solver, lr", [("adam", 1e-3), ("sgd", 0.1)])
def test_digits_accuracy_close_to_sklearn(digits, solver, lr):
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    X_train, X_test, y_train, y_test = digits
    settings = dict(hidden_layer_sizes=(64,), solver=solver, learning_rate_init=lr, max_iter=40, random_state=0)
    ours = MLPClassifier(**settings).fit(X_train, y_train).score(X_test, y_test)
    theirs = SklearnMLP(**settings).fit(X_train, y_train).score(X_test, y_test)
    assert ours > 0.93
    assert ours >= theirs - 0.02, (ours, theirs)


def test_pipeline_and_grid_search(digits):
    X_train, X_test, y_train, y_test = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=10, random_state=0))
    search = GridSearchCV(pipe, {"mlpclassifier__alpha": [1e-4, 1e-2],
                                 "mlpclassifier__learning_rate_init": [1e-3, 1e-2]}, cv=2)
    search.fit(X_train[:400], y_train[:400])
    assert set(search.best_params_) == {"mlpclassifier__alpha", "mlpclassifier__learning_rate_init"}
    assert search.score(X_test, y_test) > 0.8


def test_joblib_workers_and_pickle(digits):
    X_train, X_test, y_train, y_test = digits
    clf = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=30, random_state=0)
    scores = cross_val_score(clf, X_train[:300], y_train[:300], cv=2, n_jobs=2)  # loky worker processes
    assert scores.min() > 0.5
    clf.fit(X_train, y_train)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict(X_test), clf.predict(X_test))
    np.testing.assert_allclose(again.predict_proba(X_test), clf.predict_proba(X_test))
    again.partial_fit(X_train, y_train)  # optimizer state survived the pickle
    # scikit-learn's n_iter_ counts the epochs of the last call (1 after partial_fit); loss_curve_ all of them
    assert again.n_iter_ == 1 and len(again.loss_curve_) == len(clf.loss_curve_) + 1
    assert clone(clf).get_params() == clf.get_params()


@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_training_continued_after_unpickling_equals_training_continued_in_place(digits, solver):
    """The pickle keeps everything the trainer holds: optimizer state, step and epoch counters and the
    shuffling RNG, so the next epochs draw the same batches and take the same steps."""
    X_train, _, y_train, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(8,), solver=solver, max_iter=2, random_state=0).fit(X_train, y_train)
    again = pickle.loads(pickle.dumps(clf))
    for _ in range(2):
        clf.partial_fit(X_train, y_train)
        again.partial_fit(X_train, y_train)
    for a, b in zip(clf.coefs_ + clf.intercepts_, again.coefs_ + again.intercepts_):
        np.testing.assert_array_equal(a, b)
    assert again.loss_curve_ == clf.loss_curve_


def test_bad_parameters_raise_sklearns_exception_types():
    from fastbp.sklearn import InvalidParameterError

    X, y = np.zeros((4, 2)), [0, 1, 0, 1]
    for params, name in ((dict(alpha=-1.0), "alpha"), (dict(batch_size=0), "batch_size"),
                         (dict(activation="swish"), "activation"), (dict(early_stopping="yes"), "early_stopping"),
                         (dict(validation_fraction=1.0), "validation_fraction"), (dict(max_iter=1.5), "max_iter")):
        with pytest.raises(InvalidParameterError, match=rf"The '{name}' parameter of MLPClassifier must be"):
            MLPClassifier(**params).fit(X, y)
    assert issubclass(InvalidParameterError, ValueError) and issubclass(InvalidParameterError, TypeError)


def test_no_private_sklearn_module_is_imported():
    import inspect

    import fastbp.sklearn

    source = inspect.getsource(fastbp.sklearn)
    assert "sklearn.utils._" not in source and "from sklearn._" not in source


def test_parameter_names_follow_sklearn():
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    shared = {"hidden_layer_sizes", "activation", "solver", "alpha", "batch_size", "learning_rate_init",
              "max_iter", "random_state", "early_stopping", "validation_fraction", "n_iter_no_change", "tol",
              "momentum", "nesterovs_momentum", "beta_1", "beta_2", "epsilon", "warm_start", "verbose"}
    assert shared <= set(MLPClassifier().get_params()) & set(SklearnMLP().get_params())
    assert "device" in MLPClassifier().get_params()


def test_early_stopping_records_validation_scores(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(32,), early_stopping=True, n_iter_no_change=3, max_iter=200,
                        learning_rate_init=0.01, random_state=0).fit(X_train, y_train)
    assert clf.n_iter_ < 200
    assert len(clf.validation_scores_) == clf.n_iter_ == len(clf.loss_curve_)
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert clf.best_loss_ is None


def test_early_stopping_restores_the_best_epochs_weights(digits):
    # A high learning rate makes the validation score swing, so that the last epoch is worse than the best:
    # only restoring the best epoch's weights makes the held-out split (the same split the estimator drew)
    # score best_validation_score_ again.
    X_train, _, y_train, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(32,), solver="sgd", learning_rate_init=0.3, early_stopping=True,
                        n_iter_no_change=3, max_iter=200, random_state=0).fit(X_train, y_train)
    assert clf.validation_scores_[-1] < clf.best_validation_score_  # the check below means something
    # scikit-learn's split: its random state after drawing the initial weights (not stratified for multiclass)
    rng = np.random.RandomState(0)
    for fan_in, fan_out in ((64, 32), (32, 10)):
        rng.uniform(size=(fan_in, fan_out)), rng.uniform(size=fan_out)
    _, X_val, _, y_val = train_test_split(X_train, y_train, random_state=rng, test_size=clf.validation_fraction)
    assert clf.score(X_val, y_val) == clf.best_validation_score_


def test_labels_of_any_type_and_binary(digits):
    X_train, X_test, y_train, _ = digits
    labels = np.array(["zero", "one"])[(y_train % 2)]
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0).fit(X_train, labels)
    assert list(clf.classes_) == ["one", "zero"]
    assert clf.predict_proba(X_test).shape == (len(X_test), 2)
    assert set(clf.predict(X_test)) <= {"zero", "one"}


def test_partial_fit_needs_classes(digits):
    X_train, _, y_train, _ = digits
    clf = MLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    with pytest.raises(ValueError, match="classes"):
        clf.partial_fit(X_train, y_train)
    clf.partial_fit(X_train[:100], y_train[:100], classes=np.arange(10))
    clf.partial_fit(X_train[100:200], y_train[100:200])
    # as scikit-learn: n_iter_ is the last call's epochs, loss_curve_ and t_ cover both calls
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 2 and clf.t_ == 200


def test_regressor_one_and_two_outputs():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(200, 3))
    y2 = np.column_stack([X.sum(axis=1), X[:, 0] - X[:, 1]])
    reg = MLPRegressor(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=200, random_state=0)
    assert reg.fit(X, y2[:, 0]).predict(X).shape == (200,)
    assert reg.score(X, y2[:, 0]) > 0.9
    assert reg.fit(X, y2).predict(X).shape == (200, 2)
    assert reg.score(X, y2) > 0.9


def test_lbfgs_is_supported_and_has_no_partial_fit():
    # (Formerly lbfgs raised ValueError; it now runs scipy's L-BFGS-B on fastbp's loss and gradient.)
    clf = MLPClassifier(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=20, random_state=0)
    clf.fit(np.array([[0.0, 0], [0, 1], [1, 0], [1, 1]]), [0, 1, 1, 0])
    assert clf.n_iter_ <= 20 and np.isfinite(clf.loss_)
    assert not hasattr(clf, "partial_fit") and not hasattr(clf, "loss_curve_")


def test_verbose_estimator_reports_progress(digits, capsys):
    X_train, _, y_train, _ = digits
    MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, verbose=2, random_state=0).fit(X_train, y_train)
    assert capsys.readouterr().err.count("epoch ") == 3
    MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X_train, y_train)
    assert capsys.readouterr().err == ""


def test_cuda_device_without_a_gpu_says_why():
    from fastbp.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("CUDA is usable here")
    with pytest.raises(RuntimeError, match="device='cuda' cannot be used"):
        MLPClassifier(device="cuda", max_iter=1).fit(np.zeros((4, 2)), [0, 1, 0, 1])


def test_solver_specific_parameters_keep_scikit_learns_behaviour():
    """scikit-learn's estimators accept parameters that only some solvers read (momentum with adam, beta_1 with
    sgd, an activation without hidden layers) and ignore them; so do fastbp's: the estimator hands the Trainer
    only what the solver reads, and the Trainer's refusal of unused options never reaches the user here."""
    X, y = load_iris(return_X_y=True)
    for solver in ("adam", "sgd", "lbfgs"):
        kwargs = dict(momentum=0.5, nesterovs_momentum=False, beta_1=0.5, beta_2=0.9, epsilon=1e-6,
                      hidden_layer_sizes=(), activation="tanh", max_iter=3, random_state=0, solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = MLPClassifier(**kwargs).fit(X, y)
        assert [c.shape for c in clf.coefs_] == [(4, 3)]


@pytest.mark.parametrize("early_stopping", [False, True])
def test_epoch_loop_never_hands_a_long_vector_to_blas(digits, monkeypatch, early_stopping):
    """Between two compiled epochs, a BLAS call on more than 10000 numbers wakes OpenBLAS's threads, which then
    spin for about 50 ms on the cores numba's parallel regions wait for: the per-epoch np.dot over the weights
    made each epoch of a 100-128-5 fit 5x slower (issue 27; fastbp._blas_free). Here np.dot refuses long
    vectors during fits of a network with 12810 weights, with and without the validation score."""
    real_dot = np.dot

    def guarded_dot(a, b, *args, **kwargs):
        assert min(np.size(a), np.size(b)) <= 10000, "a BLAS dot over a long vector inside the epoch loop"
        return real_dot(a, b, *args, **kwargs)

    X_train, _, y_train, _ = digits
    X = np.hstack([X_train, X_train[:, :36]]).astype(np.float32)  # 100 features: 100 x 128 + 128 x 10 weights
    monkeypatch.setattr(np, "dot", guarded_dot)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=3, early_stopping=early_stopping, random_state=0)
    clf.fit(X, y_train, sample_weight=np.linspace(0.5, 1.5, len(X)))
    assert len(clf.loss_curve_) == 3


def test_sums_without_blas_match_numpy(rng):
    from fastbp._blas_free import sum_of_products, sum_of_squares

    a = rng.normal(size=30001).astype(np.float32)
    b = rng.normal(size=(3, 10000, 1)).astype(np.float32)
    assert sum_of_products(a, a) == pytest.approx(np.dot(a.astype(np.float64), a.astype(np.float64)), rel=1e-12)
    assert sum_of_squares([a, b]) == pytest.approx(float((a.astype(np.float64) ** 2).sum()
                                                         + (b.astype(np.float64) ** 2).sum()), rel=1e-12)
    assert sum_of_products(np.array([True, False]), np.array([2.0, 3.0])) == 2.0


def test_labels_become_scikit_learns_indicator_rows():
    from sklearn.preprocessing import LabelBinarizer

    from fastbp.sklearn import _binarize

    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 5, 40), rng.integers(0, 2, 40) * 7 - 3, np.array(["b", "a", "c", "a"] * 5),
             np.array(["yes"] * 6), np.array([1.0, 2.0] * 4), rng.integers(0, 2, (30, 3))]
    for y in cases:
        binarizer = LabelBinarizer().fit(y)
        np.testing.assert_array_equal(_binarize(binarizer, y), binarizer.transform(y).astype(bool))
    binarizer = LabelBinarizer().fit(np.arange(4))  # partial_fit: classes fitted first, y holds some of them
    np.testing.assert_array_equal(_binarize(binarizer, np.array([3, 3, 1])), binarizer.transform([3, 3, 1]) == 1)


def test_lbfgs_solves_with_one_blas_thread_and_restores_the_count(monkeypatch):
    """L-BFGS-B's vector operations are BLAS calls whose spinning threads slowed the compiled loss and
    gradient between them 3x (fastbp._blas_free): the solve runs with one BLAS thread, and the process's
    setting comes back after it."""
    import scipy.optimize
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    if not before or max(before) == 1:
        pytest.skip("BLAS runs one thread here already: nothing to limit")
    seen = []
    real_minimize = scipy.optimize.minimize

    def watched_minimize(*args, **kwargs):
        seen.append(blas_threads())
        return real_minimize(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", watched_minimize)
    X, y = load_iris(return_X_y=True)
    MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
    assert seen and all(n == 1 for n in seen[0])
    assert blas_threads() == before
