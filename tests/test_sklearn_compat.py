"""fastbp.sklearn as a drop-in for scikit-learn 1.9's MLPClassifier / MLPRegressor, with the real estimators
as the reference: signatures, initial weights, in-order SGD trajectories (float64, to rounding), schedules,
early stopping's split and scores, verbose lines, warnings and errors, lbfgs, attributes, inputs (sparse,
pandas, dtypes), coefs_ assignment, partial_fit / warm_start bookkeeping. Small networks on a few hundred
digits rows keep it fast."""
import contextlib
import inspect
import io
import re
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
scipy_sparse = pytest.importorskip("scipy.sparse")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkRegressor  # noqa: E402

from fastbp.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

pytestmark = [pytest.mark.skipif(tuple(int(p) for p in sklearn.__version__.split(".")[:2]) < (1, 9),
                                 reason="the reference behaviour is scikit-learn 1.9's"),
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]  # pytest.warns still sees

PAIRS = {"classifier": (SkClassifier, MLPClassifier), "regressor": (SkRegressor, MLPRegressor)}


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    X, y = X[:400] / 16.0, y[:400]
    return {"multiclass": (X, y), "binary": (X, y > 4), "multilabel": (X, np.c_[y > 4, y % 2 == 0, y < 2].astype(int)),
            "regression": (X, X[:, 10] + 0.5 * X[:, 20]), "multioutput": (X, np.c_[X[:, 10], 2 * X[:, 20]])}


def _pair(target):
    return PAIRS["regressor" if target in ("regression", "multioutput") else "classifier"]


def _fit_both(target, data, **params):
    """(scikit-learn's estimator, fastbp's), each fitted with params on the same data, warnings silenced."""
    X, y = data[target]
    theirs, ours = _pair(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return theirs(**params).fit(X, y), ours(**params).fit(X, y)


def _assert_same_parameters(a, b, atol):
    assert [c.shape for c in a.coefs_] == [c.shape for c in b.coefs_]
    assert [c.shape for c in a.intercepts_] == [c.shape for c in b.intercepts_]
    for p, q in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_allclose(q, p, rtol=0, atol=atol)


def _stdout_of(fit, *args):
    """What fit(*args) prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit(*args)
    return out.getvalue()


# -- the constructor ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_constructor_signature_is_sklearns_plus_device_and_dtype(kind):
    theirs, ours = PAIRS[kind]
    reference = list(inspect.signature(theirs).parameters.values())
    mine = list(inspect.signature(ours).parameters.values())
    assert [p.name for p in mine] == [p.name for p in reference] + ["device", "dtype"]
    for p, q in zip(reference, mine):
        assert (q.kind, q.default) == (p.kind, p.default), p.name
    assert ours().get_params()["dtype"] is None and ours().get_params()["device"] == "cpu"


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_estimator_tags_are_sklearns(kind):
    theirs, ours = PAIRS[kind]
    a, b = theirs().__sklearn_tags__(), ours().__sklearn_tags__()
    assert a.input_tags == b.input_tags and a.classifier_tags == b.classifier_tags
    assert a.estimator_type == b.estimator_type
    # The regressor's multi_output tag says what it supports (scikit-learn 1.9 leaves it False).
    assert b.target_tags.multi_output == (kind == "regressor")


# -- the same steps as scikit-learn ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["multiclass", "binary", "multilabel", "regression", "multioutput"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_in_order_sgd_follows_sklearns_trajectory(data, target, nesterov):
    """Same initial weights (scikit-learn's draws), the same in-order mini-batches, the same loss units and
    momentum rule: float64 results equal to rounding."""
    lr = 0.01 if target in ("regression", "multioutput") else 0.1
    a, b = _fit_both(target, data, hidden_layer_sizes=(8, 6), solver="sgd", shuffle=False, alpha=0.0,
                     learning_rate_init=lr, nesterovs_momentum=nesterov, batch_size=64, max_iter=3, random_state=0)
    _assert_same_parameters(a, b, atol=1e-10)
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=1e-10)
    for name in ("n_iter_", "t_", "n_layers_", "n_outputs_", "out_activation_", "n_features_in_"):
        assert getattr(b, name) == getattr(a, name), name
    assert b.loss_ == pytest.approx(a.loss_, rel=1e-10)
    X = data[target][0]
    if target in ("regression", "multioutput"):
        np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-10)
    else:
        np.testing.assert_array_equal(b.predict(X), a.predict(X))
    if target in ("multiclass", "binary", "multilabel"):
        np.testing.assert_allclose(b.predict_proba(X), a.predict_proba(X), atol=1e-10)
        np.testing.assert_array_equal(b.classes_, a.classes_)


def test_initial_weights_are_sklearns(data):
    # One in-order epoch at a tiny rate stays within 1e-6 of the initial weights, for both estimators.
    for activation in ("relu", "logistic"):
        a, b = _fit_both("multiclass", data, hidden_layer_sizes=(5,), activation=activation, solver="sgd",
                         shuffle=False, learning_rate_init=1e-9, max_iter=1, random_state=3)
        _assert_same_parameters(a, b, atol=1e-12)


@pytest.mark.parametrize("schedule", [dict(learning_rate="invscaling", power_t=0.3, learning_rate_init=0.5),
                                      dict(learning_rate="adaptive", tol=0.15, n_iter_no_change=1,
                                           learning_rate_init=0.2)])
def test_learning_rate_schedules_follow_sklearn_exactly(data, schedule):
    """invscaling changes the rate after every epoch, adaptive divides it by 5 after stalls; under momentum the
    buffer is rescaled so that the steps stay scikit-learn's. The verbose lines are the same too."""
    X, y = data["multiclass"]
    params = dict(hidden_layer_sizes=(8,), solver="sgd", shuffle=False, alpha=0.0, batch_size=50, max_iter=10,
                  random_state=0, verbose=True, **schedule)
    a, b = SkClassifier(**params), MLPClassifier(**params)
    out_a, out_b = _stdout_of(a.fit, X, y), _stdout_of(b.fit, X, y)
    assert out_b == out_a
    _assert_same_parameters(a, b, atol=1e-10)
    if schedule["learning_rate"] == "adaptive":
        assert "Setting learning rate to" in out_b


def test_early_stopping_split_scores_and_restored_weights_are_sklearns(data):
    """The held-out rows are scikit-learn's (the same random state after the initial draws; stratified for
    binary targets, not for multiclass), so with in-order SGD the validation scores, the stop and the restored
    best weights are scikit-learn's."""
    for target in ("multiclass", "binary"):
        X, y = data[target]
        params = dict(hidden_layer_sizes=(8,), solver="sgd", shuffle=False, alpha=0.0, learning_rate_init=0.3,
                      early_stopping=True, validation_fraction=0.2, n_iter_no_change=2, max_iter=60,
                      random_state=0, verbose=True)
        a, b = SkClassifier(**params), MLPClassifier(**params)
        out_a, out_b = _stdout_of(a.fit, X, y), _stdout_of(b.fit, X, y)
        assert out_b == out_a and "Validation score did not improve" in out_b
        assert b.validation_scores_ == a.validation_scores_
        assert b.best_validation_score_ == a.best_validation_score_ and b.best_loss_ is a.best_loss_ is None
        _assert_same_parameters(a, b, atol=1e-10)


def test_penalty_enters_like_sklearns(data):
    """alpha: the weights get scikit-learn's pull; fastbp also pulls the biases (module docstring), a small
    difference at this alpha; loss_curve_ includes the penalty term like scikit-learn's."""
    a, b = _fit_both("multiclass", data, hidden_layer_sizes=(8,), solver="sgd", shuffle=False, alpha=1e-2,
                     learning_rate_init=0.1, max_iter=5, random_state=0)
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=1e-3)
    for p, q in zip(a.coefs_, b.coefs_):
        np.testing.assert_allclose(q, p, atol=1e-3)


@pytest.mark.parametrize("target", ["multiclass", "binary", "regression"])
def test_in_order_adam_is_close_to_sklearns(data, target):
    """Adam differs only by where epsilon enters (module docstring): the losses agree closely."""
    a, b = _fit_both(target, data, hidden_layer_sizes=(8,), solver="adam", shuffle=False, learning_rate_init=0.01,
                     max_iter=5, random_state=0)
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=2e-3)


@pytest.mark.parametrize("target", ["multiclass", "binary", "multilabel", "multioutput"])
def test_lbfgs_reaches_sklearns_loss(data, target):
    a, b = _fit_both(target, data, hidden_layer_sizes=(8,), solver="lbfgs", max_iter=25, random_state=0)
    assert b.loss_ == pytest.approx(a.loss_, rel=1e-4)
    assert b.n_iter_ == a.n_iter_ == 25
    assert type(b.loss_) is type(a.loss_) is np.float64
    assert not hasattr(b, "loss_curve_") and not hasattr(a, "loss_curve_") and b.t_ == a.t_ == 0
    assert b.coefs_[0].dtype == a.coefs_[0].dtype == np.float64
    X = data[target][0]
    assert b.score(X, data[target][1]) == pytest.approx(a.score(X, data[target][1]), abs=0.02)


def test_lbfgs_convergence_warning_is_sklearns(data):
    X, y = data["multiclass"]
    messages = []
    for estimator in (SkClassifier, MLPClassifier):
        with pytest.warns(ConvergenceWarning) as record:
            estimator(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=3, random_state=0).fit(X, y)
        messages.append([str(w.message) for w in record if w.category is ConvergenceWarning])
    assert messages[1] == messages[0] and "lbfgs failed to converge after 3 iteration(s)" in messages[1][0]


def test_lbfgs_max_fun_and_tol_are_passed_as_sklearn_passes_them(data):
    a, b = _fit_both("multiclass", data, hidden_layer_sizes=(4,), solver="lbfgs", max_fun=10, max_iter=200,
                     random_state=0)
    assert b.n_iter_ == a.n_iter_ <= 10
    a, b = _fit_both("multiclass", data, hidden_layer_sizes=(4,), solver="lbfgs", tol=1.0, random_state=0)
    assert b.n_iter_ == a.n_iter_


# -- stopping, warnings, verbose ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_stochastic_max_iter_warning_and_verbose_lines_are_sklearns(data, solver):
    X, y = data["multiclass"]
    out, caught = [], []
    for estimator in (SkClassifier, MLPClassifier):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), pytest.warns(ConvergenceWarning) as record:
            estimator(hidden_layer_sizes=(4,), solver=solver, max_iter=2, verbose=1, random_state=0).fit(X, y)
        out.append(buffer.getvalue().splitlines())
        caught.append([str(w.message) for w in record])
    assert caught[1] == caught[0] == ["Stochastic Optimizer: Maximum iterations (2) reached and the optimization "
                                      "hasn't converged yet."]
    assert [line.split("=")[0] for line in out[1]] == [line.split("=")[0] for line in out[0]] == \
        ["Iteration 1, loss ", "Iteration 2, loss "]
    assert all(len(line.split("= ")[1].split(".")[1]) == 8 for line in out[1])  # "%.8f"


def test_training_loss_stop_message_and_count_are_sklearns(data):
    X, y = data["multiclass"]
    params = dict(hidden_layer_sizes=(8,), solver="sgd", shuffle=False, alpha=0.0, tol=0.05, n_iter_no_change=2,
                  max_iter=50, learning_rate_init=0.05, random_state=0, verbose=True)
    a, b = SkClassifier(**params), MLPClassifier(**params)
    out_a, out_b = _stdout_of(a.fit, X, y), _stdout_of(b.fit, X, y)
    assert out_b == out_a
    assert out_b.splitlines()[-1] == ("Training loss did not improve more than tol=0.050000 for 2 consecutive "
                                      "epochs. Stopping.")
    assert b.n_iter_ == a.n_iter_ < 50 and b.best_loss_ == pytest.approx(a.best_loss_, rel=1e-10)


def test_n_iter_no_change_inf_runs_every_epoch(data):
    X, y = data["multiclass"]
    for estimator in (SkClassifier, MLPClassifier):
        with pytest.warns(ConvergenceWarning):
            clf = estimator(hidden_layer_sizes=(4,), tol=10.0, n_iter_no_change=np.inf, max_iter=7,
                            random_state=0).fit(X, y)
        assert clf.n_iter_ == 7 and len(clf.loss_curve_) == 7


def test_shuffle_false_is_deterministic_and_shuffle_true_is_seeded(data):
    X, y = data["multiclass"]
    fit = lambda **kw: MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, **kw).fit(X, y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _assert_same_parameters(fit(shuffle=False, random_state=0), fit(shuffle=False, random_state=0), atol=0)
        _assert_same_parameters(fit(random_state=5), fit(random_state=5), atol=0)
        first, other = fit(random_state=5), fit(random_state=6)
    assert not np.array_equal(first.coefs_[0], other.coefs_[0])


# -- partial_fit and warm_start -------------------------------------------------------------------------------
def test_partial_fit_bookkeeping_is_sklearns(data):
    X, y = data["multiclass"]
    for estimator in (SkClassifier, MLPClassifier):
        clf = estimator(hidden_layer_sizes=(4,), random_state=0)
        clf.partial_fit(X[:100], y[:100], classes=np.arange(10))
        clf.partial_fit(X[100:300], y[100:300])
        assert (clf.n_iter_, clf.t_, len(clf.loss_curve_)) == (1, 300, 2)
        with pytest.raises(ValueError, match="is not the same as on last call to partial_fit"):
            clf.partial_fit(X, y, classes=np.arange(5))
        with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
            clf.set_params(early_stopping=True).partial_fit(X, y)
    for estimator in (SkClassifier, MLPClassifier):
        assert not hasattr(estimator(solver="lbfgs"), "partial_fit")
    for estimator in (SkRegressor, MLPRegressor):  # scikit-learn's regressor keeps it (an lbfgs run)
        assert hasattr(estimator(solver="lbfgs"), "partial_fit")
    for estimator in (SkClassifier, MLPClassifier):
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'"):
            estimator(solver="lbfgs").partial_fit(np.zeros((2, 1)), [0, 1], classes=[0, 1])


def test_partial_fit_multilabel_first_call_needs_no_classes_set(data):
    X, Y = data["multilabel"]
    for estimator in (SkClassifier, MLPClassifier):
        clf = estimator(hidden_layer_sizes=(4,), random_state=0).partial_fit(X, Y, classes=[0, 1, 2])
        assert clf.predict(X[:3]).shape == (3, 3)


def test_warm_start_bookkeeping_and_class_check_are_sklearns(data):
    X, y = data["multiclass"]
    for estimator in (SkClassifier, MLPClassifier):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = estimator(hidden_layer_sizes=(4,), max_iter=3, warm_start=True, random_state=0).fit(X, y)
            coefs = [c.copy() for c in clf.coefs_]
            clf.fit(X, y)
        assert (clf.n_iter_, len(clf.loss_curve_), clf.t_) == (3, 6, 6 * len(X))
        assert not np.array_equal(coefs[0], clf.coefs_[0])
        with pytest.raises(ValueError, match="warm_start can only be used where `y` has the same classes"):
            clf.fit(X[y < 5], y[y < 5])


def test_partial_fit_continues_the_optimizer_and_warm_start_resets_it(data):
    """scikit-learn keeps its optimizer across partial_fit calls and makes a new one for every fit: with
    in-order SGD under momentum both bookkeepings give scikit-learn's weights."""
    X, y = data["multiclass"]
    params = dict(hidden_layer_sizes=(6,), solver="sgd", shuffle=False, alpha=0.0, learning_rate_init=0.1,
                  max_iter=2, random_state=0)
    models = []
    for estimator in (SkClassifier, MLPClassifier):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warm = estimator(warm_start=True, **params).fit(X, y).fit(X, y)
        partial = estimator(**params)
        partial.partial_fit(X, y, classes=np.arange(10)).partial_fit(X, y)
        models.append((warm, partial))
    _assert_same_parameters(models[0][0], models[1][0], atol=1e-10)
    _assert_same_parameters(models[0][1], models[1][1], atol=1e-10)


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["too_small_validation", "zero_fraction", "hidden_zero", "nan_X", "continuous_y",
                                  "bad_solver", "n_iter_no_change_float", "features_mismatch", "multioutput_labels"])
def test_errors_are_sklearns(data, case):
    X, y = data["multiclass"]
    fit = {
        "too_small_validation": lambda E: E(early_stopping=True, max_iter=2).fit(X[:10], y[:10]),
        "zero_fraction": lambda E: E(early_stopping=True, validation_fraction=0.0, max_iter=2).fit(X, y),
        "hidden_zero": lambda E: E(hidden_layer_sizes=(3, 0), max_iter=2).fit(X, y),
        "nan_X": lambda E: E(max_iter=2).fit(np.where(X == 0, np.nan, X), y),
        "continuous_y": lambda E: E(max_iter=2).fit(X, X[:, 10] + 0.1),
        "bad_solver": lambda E: E(solver="newton").fit(X, y),
        "n_iter_no_change_float": lambda E: E(n_iter_no_change=2.5).fit(X, y),
        "features_mismatch": lambda E: E(hidden_layer_sizes=(3,), max_iter=2).fit(X, y).predict(X[:, :10]),
        "multioutput_labels": lambda E: E(max_iter=2).fit(X, np.c_[y, y]),
    }[case]
    errors = []
    for estimator in (SkClassifier, MLPClassifier):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(Exception) as info:
                fit(estimator)
        errors.append(info.value)
    theirs, ours = errors
    assert isinstance(ours, ValueError) and isinstance(theirs, ValueError)
    if case in ("bad_solver", "n_iter_no_change_float"):
        assert isinstance(ours, TypeError) == isinstance(theirs, TypeError)  # InvalidParameterError
        assert str(ours).split(" must be ")[0] == str(theirs).split(" must be ")[0]
    else:
        assert type(ours) is type(theirs) and str(ours) == str(theirs)


def test_unfitted_and_clipped_batch(data):
    X, y = data["multiclass"]
    for estimator in (SkClassifier, MLPClassifier):
        with pytest.raises(NotFittedError):
            estimator().predict(X)
        with pytest.warns(UserWarning, match="Got `batch_size` less than 1 or larger than sample size"):
            estimator(hidden_layer_sizes=(3,), batch_size=1000, max_iter=1).fit(X, y)


# -- inputs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_input_trains_and_predicts_as_dense(data, fmt):
    X, y = data["multiclass"]
    Xs = scipy_sparse.csr_matrix(X) if fmt == "csr" else scipy_sparse.csc_matrix(X)
    params = dict(hidden_layer_sizes=(8,), max_iter=3, random_state=0, early_stopping=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        dense, sparse = MLPClassifier(**params).fit(X, y), MLPClassifier(**params).fit(Xs, y)
    _assert_same_parameters(dense, sparse, atol=0)
    np.testing.assert_array_equal(sparse.predict_proba(Xs), dense.predict_proba(X))
    np.testing.assert_array_equal(sparse.predict(scipy_sparse.csr_array(X)), dense.predict(X))


def test_pandas_frames_keep_feature_names(data):
    pd = pytest.importorskip("pandas")
    X, y = data["regression"]
    frame = pd.DataFrame(X[:, :12], columns=[f"pixel{i}" for i in range(12)])
    a, b = SkRegressor(hidden_layer_sizes=(4,), max_iter=2), MLPRegressor(hidden_layer_sizes=(4,), max_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a.fit(frame, pd.Series(y)), b.fit(frame, pd.Series(y))
    np.testing.assert_array_equal(b.feature_names_in_, a.feature_names_in_)
    for estimator in (a, b):
        with pytest.warns(UserWarning, match="X does not have valid feature names"):
            estimator.predict(frame.to_numpy())
        with pytest.raises(ValueError, match="The feature names should match those that were passed during fit"):
            estimator.predict(frame.rename(columns={"pixel0": "other"}))


def test_dtypes_follow_the_input_as_in_sklearn(data):
    X, y = data["multiclass"]
    for dtype in (np.float32, np.float64, np.int64):
        a, b = _fit_both("multiclass", {"multiclass": (X.astype(dtype) if dtype != np.int64
                                                       else (X * 16).astype(dtype), y)},
                         hidden_layer_sizes=(4,), max_iter=2, random_state=0)
        assert b.coefs_[0].dtype == a.coefs_[0].dtype
        for query in (X.astype(np.float32), X):
            assert b.predict_proba(query).dtype == a.predict_proba(query).dtype
    forced = MLPClassifier(hidden_layer_sizes=(4,), max_iter=1, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert forced.fit(X, y).coefs_[0].dtype == np.float32


# -- attributes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("early_stopping", [False, True])
@pytest.mark.parametrize("target", ["multiclass", "binary", "multilabel", "multioutput"])
def test_fitted_attributes_have_sklearns_types_and_shapes(data, target, early_stopping):
    a, b = _fit_both(target, data, hidden_layer_sizes=(5, 3), max_iter=3, early_stopping=early_stopping,
                     random_state=0)
    names = ["loss_", "best_loss_", "loss_curve_", "validation_scores_", "best_validation_score_", "t_", "n_iter_",
             "n_layers_", "n_outputs_", "out_activation_", "n_features_in_", "coefs_", "intercepts_"]
    if target != "multioutput":
        names.append("classes_")
    for name in names:
        theirs, ours = getattr(a, name), getattr(b, name)
        assert isinstance(ours, type(theirs)) or (theirs is None and ours is None), name
        if isinstance(theirs, list):
            assert len(ours) == len(theirs), name
            assert [np.shape(v) for v in ours] == [np.shape(v) for v in theirs], name
            assert all(isinstance(v, type(w)) for v, w in zip(ours, theirs)), name
        if isinstance(theirs, np.ndarray):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
    X = data[target][0]
    assert b.predict(X).shape == a.predict(X).shape and b.predict(X).dtype == a.predict(X).dtype
    if target != "multioutput":
        assert b.predict_proba(X).shape == a.predict_proba(X).shape
        assert b.predict_log_proba(X).shape == a.predict_log_proba(X).shape


def test_setting_coefs_changes_the_model(data):
    """coefs_ / intercepts_ are settable like scikit-learn's attributes: scikit-learn's fitted weights put into
    a fastbp estimator give scikit-learn's predictions."""
    X, y = data["multiclass"]
    a, b = _fit_both("multiclass", data, hidden_layer_sizes=(6,), max_iter=5, random_state=0)
    b2 = MLPClassifier(hidden_layer_sizes=(6,), max_iter=5, random_state=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        b2.fit(X, y)
    b2.coefs_ = a.coefs_
    b2.intercepts_ = [i.tolist() for i in a.intercepts_]
    np.testing.assert_allclose(b2.predict_proba(X), a.predict_proba(X), atol=1e-12)
    b.coefs_[1] = np.zeros_like(a.coefs_[1])  # item assignment reaches the model
    b.intercepts_[1][...] = np.log(np.arange(1, 11))  # and so do in-place edits
    np.testing.assert_allclose(b.predict_proba(X[:2]), np.tile(np.arange(1, 11) / 55, (2, 1)), rtol=1e-12)
    with pytest.raises(ValueError, match=r"coefs_\[0\] must have shape \(64, 6\)"):
        b.coefs_ = [np.zeros((6, 64)), np.zeros((6, 10))]
    with pytest.raises(ValueError, match="must have shape"):
        b.coefs_[1] = np.zeros(3)
    with pytest.raises(ValueError, match="list of 2 arrays"):
        b.intercepts_ = [np.zeros(6)]
    unfitted = MLPClassifier()  # kept as given until a partial_fit / warm-started fit starts from them
    unfitted.coefs_ = a.coefs_
    assert unfitted.coefs_ is a.coefs_ and not hasattr(unfitted, "model_")


# -- sample weights ---------------------------------------------------------------------------------------------
def test_equal_sample_weights_are_exact_and_bad_ones_raise(data):
    X, y = data["multiclass"]
    params = dict(hidden_layer_sizes=(6,), max_iter=3, random_state=0, alpha=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        weighted = MLPClassifier(**params).fit(X, y, sample_weight=np.full(len(X), 4.0))
        rescaled = MLPClassifier(**(params | {"alpha": 1e-2 / 4})).fit(X, y)
        a, b = _fit_both("multiclass", data, solver="lbfgs", max_iter=10, hidden_layer_sizes=(4,), random_state=0)
        b_weighted = MLPClassifier(solver="lbfgs", max_iter=10, hidden_layer_sizes=(4,), random_state=0).fit(
            X, y, sample_weight=[3.0] * len(X))
        a_weighted = SkClassifier(solver="lbfgs", max_iter=10, hidden_layer_sizes=(4,), random_state=0).fit(
            X, y, sample_weight=[3.0] * len(X))
    _assert_same_parameters(weighted, rescaled, atol=0)
    assert b_weighted.loss_ == pytest.approx(a_weighted.loss_, rel=1e-4)
    for bad, message in ((np.ones(3), "sample_weight.shape"), (np.zeros(len(X)), "at least one non-zero"),
                         (np.r_[-1.0, np.ones(len(X) - 1)], "Negative values")):
        clf = MLPClassifier(**params)
        with pytest.raises(ValueError, match=message):
            clf.fit(X, y, sample_weight=bad)
        assert not hasattr(clf, "classes_")  # refused before anything changed
    for bad, message in ((np.ones(3), "sample_weight.shape"), (np.zeros(len(X)), "at least one non-zero")):
        with pytest.raises(ValueError, match=message):
            MLPClassifier(**params).fit(X, y, sample_weight=bad)


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_unequal_sample_weights_match_sklearn(data, solver):
    X, y = data["multiclass"]
    weights = np.random.default_rng(0).uniform(0.2, 2.0, len(X))
    params = dict(hidden_layer_sizes=(6,), solver=solver, shuffle=False, alpha=0.0, learning_rate_init=0.1,
                  max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SkClassifier(**params).fit(X, y, sample_weight=weights)
        b = MLPClassifier(**params).fit(X, y, sample_weight=weights)
    _assert_same_parameters(a, b, atol=1e-8)


def test_unequal_sample_weights_in_partial_fit_match_sklearn(data):
    X, y = data["regression"]
    weights = np.random.default_rng(0).uniform(0.2, 2.0, len(X))
    params = dict(hidden_layer_sizes=(6,), solver="sgd", shuffle=False, alpha=0.0, learning_rate_init=0.01,
                  random_state=0)
    a = SkRegressor(**params).partial_fit(X, y, sample_weight=weights)
    b = MLPRegressor(**params).partial_fit(X, y, sample_weight=weights)
    _assert_same_parameters(a, b, atol=1e-8)


def test_weighted_shuffled_fit_with_early_stopping_learns_what_the_weights_say(data):
    # Shuffled mini-batches and early stopping with unequal weights: not step for step scikit-learn's (other
    # random streams), so the property is statistical: on labels that are noise except in the heavily
    # weighted rows, both estimators reach about the same weighted accuracy, far above chance.
    X, y = data["multiclass"]
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, y.max() + 1, size=len(y))
    keep = rng.random(len(y)) < 0.5
    y_mixed = np.where(keep, y, noisy)
    weights = np.where(keep, 10.0, 0.01)
    params = dict(hidden_layer_sizes=(32,), early_stopping=True, max_iter=60, random_state=0,
                  learning_rate_init=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SkClassifier(**params).fit(X, y_mixed, sample_weight=weights)
        b = MLPClassifier(**params).fit(X, y_mixed, sample_weight=weights)
    score_a, score_b = a.score(X[keep], y[keep]), b.score(X[keep], y[keep])
    assert score_b > 0.7 and abs(score_a - score_b) < 0.15, (score_a, score_b)
    unweighted = MLPClassifier(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        unweighted.fit(X, y_mixed)
    assert score_b > unweighted.score(X[keep], y[keep])  # the weights changed what was learned


def _poisson_data(n=300, k=1, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    rates = np.exp(0.3 * X[:, :1] + 0.2 * X[:, 1:2] + 0.1 * np.arange(k))
    y = rng.poisson(rates).astype(float)
    return X, (y.ravel() if k == 1 else y)


@pytest.mark.parametrize("k, weighted", [(1, False), (1, True), (3, False)], ids=["1-output", "weighted", "3-outputs"])
def test_poisson_lbfgs_matches_sklearn(k, weighted):
    """scikit-learn's half Poisson deviance (summed over outputs, its y log y - y constant included) with the
    exp output: lbfgs on fastbp's poisson loss takes scikit-learn's path, so loss_, n_iter_ and the
    predictions agree to float64 rounding."""
    X, y = _poisson_data(k=k)
    w = np.random.default_rng(1).random(len(X)) if weighted else None
    params = dict(loss="poisson", hidden_layer_sizes=(6,), solver="lbfgs", max_iter=15, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a = SkRegressor(**params).fit(X, y, sample_weight=w)
        b = MLPRegressor(**params).fit(X, y, sample_weight=w)
    assert b.out_activation_ == a.out_activation_ == "exp"
    assert b.loss_ == pytest.approx(a.loss_, rel=1e-9) and b.n_iter_ == a.n_iter_
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-7)
    assert (b.predict(X) > 0).all()


def test_poisson_in_order_sgd_matches_sklearn_epoch_by_epoch():
    X, y = _poisson_data()
    params = dict(loss="poisson", hidden_layer_sizes=(6,), solver="sgd", learning_rate_init=0.01, shuffle=False,
                  batch_size=64, max_iter=8, random_state=0, alpha=0.0)  # as the in-order tests above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        a, b = SkRegressor(**params).fit(X, y), MLPRegressor(**params).fit(X, y)
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=1e-9)
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-7)


def test_poisson_refuses_negative_targets_before_fitting():
    X, y = _poisson_data(n=40)
    y[3] = -1.0
    est = MLPRegressor(loss="poisson", hidden_layer_sizes=(4,), max_iter=5)
    with pytest.raises(ValueError, match=r"loss='poisson' needs targets y >= 0.*-1"):
        est.fit(X, y)
    assert not hasattr(est, "model_")
    MLPRegressor(loss="squared_error", hidden_layer_sizes=(4,), max_iter=2).fit(X, y)  # fine for squared error


# -- a diverging fit (scikit-learn's issue 29504) ----------------------------------------------------------------
def test_diverging_sgd_with_early_stopping_keeps_the_best_weights_as_sklearn():
    """The issue's example: the weights overflow after a few epochs. scikit-learn does not raise: it runs to
    max_iter on NaN weights (NaN losses and scores, each resetting the no-improvement count), warns, and puts
    back the best weights it saw. fastbp stops training at the first non-finite epoch and records the rest as
    scikit-learn would; the best weights (epoch 1 here) are scikit-learn's to rounding."""
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    params = dict(hidden_layer_sizes=100, activation="identity", solver="sgd", learning_rate_init=1,
                  early_stopping=True, n_iter_no_change=10, max_iter=20, random_state=0)
    fitted, messages = [], []
    for estimator in (SkRegressor, MLPRegressor):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fitted.append(estimator(**params).fit(X, y))
        messages.append([str(w.message) for w in record if w.category is ConvergenceWarning])
    a, b = fitted
    assert messages[1] == messages[0] == ["Stochastic Optimizer: Maximum iterations (20) reached and the "
                                          "optimization hasn't converged yet."]
    assert b.n_iter_ == a.n_iter_ == 20 and len(b.loss_curve_) == len(b.validation_scores_) == 20
    np.testing.assert_allclose(b.loss_curve_[:4], a.loss_curve_[:4], rtol=1e-6)  # growing by 1e5 an epoch
    assert np.isnan(b.loss_curve_[5:]).all() and np.isnan(a.loss_curve_[5:]).all()
    assert np.isnan(b.validation_scores_[4:]).all() and np.isnan(a.validation_scores_[4:]).all()
    assert b.best_validation_score_ == pytest.approx(a.best_validation_score_, rel=1e-6)
    np.testing.assert_allclose(b.predict(X), a.predict(X), rtol=1e-6)
    assert all(np.isfinite(c).all() for c in b.coefs_ + b.intercepts_)


def test_diverging_classifier_scores_nan_weights_as_sklearn_does():
    """A float32 classifier that overflows: scikit-learn's validation score of NaN weights is the share of the
    first class (the argmax of NaN rows is 0), which fastbp reproduces; the best epoch's finite weights come
    back, and they score best_validation_score_ on scikit-learn's held-out rows."""
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    X, y = load_iris(return_X_y=True)
    X = (X * 1000).astype(np.float32)
    params = dict(hidden_layer_sizes=(50,), solver="sgd", learning_rate_init=1e6, early_stopping=True,
                  n_iter_no_change=100, max_iter=12, shuffle=False, random_state=0)
    with np.errstate(all="ignore"):  # scikit-learn's overflow warnings
        a, b = (estimator(**params).fit(X, y) for estimator in (SkClassifier, MLPClassifier))
    assert b.n_iter_ == a.n_iter_ == 12
    assert not np.isfinite(b.loss_curve_[-1]) and not np.isfinite(a.loss_curve_[-1])
    assert b.validation_scores_ == a.validation_scores_ and b.best_validation_score_ == a.best_validation_score_
    rng = np.random.RandomState(0)  # scikit-learn's split: its random state after the initial draws
    for fan_in, fan_out in ((4, 50), (50, 3)):
        rng.uniform(size=(fan_in, fan_out)), rng.uniform(size=fan_out)
    _, X_val, _, y_val = train_test_split(X, y, random_state=rng, test_size=0.1)
    assert b.score(X_val, y_val) == b.best_validation_score_
    assert all(np.isfinite(c).all() for c in b.coefs_ + b.intercepts_)


def test_diverging_fit_without_early_stopping_raises_as_sklearn():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    params = dict(hidden_layer_sizes=100, activation="identity", solver="sgd", learning_rate_init=1, max_iter=20,
                  random_state=0)
    for estimator in (SkRegressor, MLPRegressor):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
                estimator(**params).fit(X, y)


# -- weights set by hand on an unfitted estimator -----------------------------------------------------------------
def _set_worked_example_weights(mlp):
    """scikit-learn's worked example (sklearn/neural_network/tests/test_mlp.py::test_fit): the attributes it sets
    by hand before its partial_fit (the private gradient and velocity buffers only scikit-learn reads)."""
    mlp.coefs_ = [0] * 2
    mlp.intercepts_ = [0] * 2
    mlp.n_outputs_ = 1
    mlp.coefs_[0] = np.array([[0.1, 0.2], [0.3, 0.1], [0.5, 0]])
    mlp.coefs_[1] = np.array([[0.1], [0.2]])
    mlp.intercepts_[0] = np.array([0.1, 0.1])
    mlp.intercepts_[1] = np.array([1.0])
    mlp.n_features_in_ = 3
    mlp.n_iter_ = 0
    mlp.n_layers_ = 3
    mlp.out_activation_ = "logistic"
    mlp.t_ = 0
    mlp.best_loss_ = np.inf
    mlp.loss_curve_ = []
    mlp._no_improvement_count = 0
    if isinstance(mlp, SkClassifier):
        mlp.learning_rate_ = 0.1
        mlp._coef_grads, mlp._intercept_grads = [0] * 2, [0] * 2
        mlp._intercept_velocity = [np.zeros_like(b) for b in mlp.intercepts_]
        mlp._coef_velocity = [np.zeros_like(w) for w in mlp.coefs_]
    return mlp


@pytest.mark.parametrize("alpha", [0.1, 0.0])
def test_weights_set_by_hand_start_partial_fit_as_in_sklearns_worked_example(alpha):
    X, y = np.array([[0.6, 0.8, 0.7]]), np.array([0])
    params = dict(solver="sgd", learning_rate_init=0.1, alpha=alpha, activation="logistic", random_state=1,
                  max_iter=1, hidden_layer_sizes=2, momentum=0)
    a, b = (_set_worked_example_weights(estimator(**params)).partial_fit(X, y, classes=[0, 1])
            for estimator in (SkClassifier, MLPClassifier))
    if alpha:  # the worked example's figures (its comments do the arithmetic), to its 3 decimals
        np.testing.assert_allclose(b.coefs_[0], [[0.098, 0.195756], [0.2956664, 0.096008], [0.4939998, -0.002244]],
                                   atol=1.5e-3)
        np.testing.assert_allclose(b.coefs_[1], [[0.04706], [0.154089]], atol=1.5e-3)
    for p, q in zip(a.coefs_, b.coefs_):  # one step from the hand-set weights: scikit-learn's to rounding
        np.testing.assert_allclose(q, p, rtol=0, atol=1e-12)
    # fastbp's weight decay also pulls the biases (module docstring): one step takes lr * alpha * b0 more.
    for p, q, b0 in zip(a.intercepts_, b.intercepts_, ([0.1, 0.1], [1.0])):
        np.testing.assert_allclose(q, p - 0.1 * alpha * np.array(b0), rtol=0, atol=1e-12)
    assert (b.n_iter_, b.t_, len(b.loss_curve_)) == (a.n_iter_, a.t_, len(a.loss_curve_)) == (1, 1, 1)
    assert b.loss_curve_[0] == pytest.approx(a.loss_curve_[0], rel=1e-12)
    if not alpha:
        assert b.predict_proba(X)[0, 1] == pytest.approx(a.predict_proba(X)[0, 1], rel=1e-12)


@pytest.mark.parametrize("target", ["regression", "multiclass"])
def test_weights_set_by_hand_start_a_warm_fit_and_a_cold_fit_draws_anew(data, target):
    """With n_features_in_ and n_outputs_ (and nothing else) set beside them, hand-set coefs_ and intercepts_
    are where a warm-started fit starts, as in scikit-learn (which also needs the counters set; fastbp starts
    them as a first fit does); a fit without warm_start draws scikit-learn's initial weights instead."""
    X, y = data[target]
    theirs, ours = _pair(target)
    k = 1 if target == "regression" else 10
    rng = np.random.default_rng(0)
    start = ([rng.normal(0, 0.3, (64, 7)), rng.normal(0, 0.3, (7, k))], [rng.normal(0, 0.1, 7), np.zeros(k)])
    params = dict(hidden_layer_sizes=(7,), solver="sgd", shuffle=False, alpha=0.0, learning_rate_init=0.01,
                  max_iter=3, random_state=0)
    fitted = []
    for estimator in (theirs, ours):
        est = estimator(warm_start=True, **params)
        est.coefs_, est.intercepts_ = [w.copy() for w in start[0]], [b.copy() for b in start[1]]
        est.n_features_in_, est.n_outputs_ = 64, k
        if estimator is theirs:  # scikit-learn reads these without setting them
            est.n_layers_, est.out_activation_ = 3, "identity" if k == 1 else "softmax"
            est.n_iter_, est.t_, est.loss_curve_, est._no_improvement_count, est.best_loss_ = 0, 0, [], 0, np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted.append(est.fit(X, y))
    _assert_same_parameters(*fitted, atol=1e-10)
    np.testing.assert_allclose(fitted[1].loss_curve_, fitted[0].loss_curve_, rtol=1e-10)
    cold = ours(**params)
    cold.coefs_, cold.intercepts_ = start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cold.fit(X, y)
        drawn = ours(**params).fit(X, y)
    _assert_same_parameters(cold, drawn, atol=0)


def test_weights_set_by_hand_are_checked_before_anything_changes(data):
    X, y = data["regression"]
    cases = {"coefs_[1] must have 7 rows": ([np.zeros((64, 7)), np.zeros((6, 1))], [np.zeros(7), np.zeros(1)]),
             "intercepts_[0] must have shape (7,)": ([np.zeros((64, 7)), np.zeros((7, 1))], [np.zeros(6), np.zeros(1)]),
             "coefs_[0] has 10 rows, one per input feature; X has 64": ([np.zeros((10, 7)), np.zeros((7, 1))],
                                                                        [np.zeros(7), np.zeros(1)]),
             "coefs_[-1] has 2 columns, one per output; y has 1": ([np.zeros((64, 7)), np.zeros((7, 2))],
                                                                   [np.zeros(7), np.zeros(2)]),
             "NaN or inf": ([np.full((64, 7), np.nan), np.zeros((7, 1))], [np.zeros(7), np.zeros(1)]),
             "intercepts_ was not set": ([np.zeros((64, 7)), np.zeros((7, 1))], None)}
    for message, (coefs, intercepts) in cases.items():
        est = MLPRegressor(hidden_layer_sizes=(7,), max_iter=2)
        est.coefs_ = coefs
        if intercepts is not None:
            est.intercepts_ = intercepts
        with pytest.raises(ValueError, match=re.escape(message)):
            est.partial_fit(X, y)
        assert not hasattr(est, "model_") and not hasattr(est, "n_outputs_") and est.coefs_ is not None
    with pytest.raises(TypeError, match="coefs_ must be a list of arrays"):
        MLPRegressor().coefs_ = 3.0
