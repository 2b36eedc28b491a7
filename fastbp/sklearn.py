"""scikit-learn estimators backed by fastbp: :class:`MLPClassifier` and :class:`MLPRegressor`.

Needs the optional extra ``pip install 'fastbp[sklearn]'`` (``import fastbp`` alone never imports
scikit-learn). The parameters carry the names of ``sklearn.neural_network.MLPClassifier`` /
``MLPRegressor`` wherever they mean the same, and the fitted attributes too (``loss_curve_``,
``validation_scores_``, ``best_validation_score_``, ``best_loss_``, ``classes_``, ``n_iter_``,
``coefs_``, ``intercepts_``, ``n_features_in_``, ``n_outputs_``).

How scikit-learn's settings map onto :class:`fastbp.Trainer`
-------------------------------------------------------------
* ``activation``: ``"logistic"`` is fastbp's ``"sigmoid"``; ``"identity"``, ``"tanh"``, ``"relu"`` are the
  same (``"sigmoid"`` and ``"leaky_relu"`` are accepted too).
* ``solver``: ``"sgd"`` is ``torch.optim.SGD(momentum=momentum, nesterov=nesterovs_momentum)`` with a
  constant rate, which is exactly scikit-learn's constant-rate SGD with momentum; ``"adam"`` is
  ``torch.optim.Adam(betas=(beta_1, beta_2), eps=epsilon)`` (scikit-learn adds epsilon after the bias
  correction of the second moment, torch before: a difference of order epsilon). ``"lbfgs"`` is not
  available and raises ValueError.
* ``alpha``: scikit-learn minimises ``loss + alpha / (2 * n_batch) * sum ||W||^2`` (weights only), whose
  gradient adds ``alpha / n_batch * W``. fastbp's ``weight_decay`` adds ``weight_decay * p`` to the gradient
  of every parameter, biases included. We set ``weight_decay = alpha / batch_size`` (classifier) and
  ``2 * alpha / batch_size`` (regressor, see below): the same pull on the weights as scikit-learn, and
  in addition a pull of the same strength on the biases (tiny for the default ``alpha=1e-4``).
  ``loss_curve_`` holds the data loss only (scikit-learn's includes the penalty term).
* Regressor loss: fastbp's mse is ``mean((out - y)**2)``, scikit-learn's squared error is half of it, so
  its gradient is twice scikit-learn's. With ``solver="sgd"`` the learning rate is halved
  (``lr = learning_rate_init / 2``) so that the steps are the same; Adam is invariant to that scale.
  ``loss_curve_`` (and the ``tol`` rule) use scikit-learn's units: half of fastbp's mse.
* Classifier: softmax cross-entropy over ``len(classes_)`` outputs for every number of classes, two
  included (a 2-output softmax is a reparametrised logistic output: same model family, same loss).
  Labels of any type; ``predict_proba`` columns follow ``classes_``. Multilabel ``y`` is not supported.
* Stopping: as scikit-learn. Without ``early_stopping``, training stops when the training loss has not
  improved by ``tol`` for ``n_iter_no_change`` consecutive epochs; with it, a stratified (classifier)
  ``validation_fraction`` of the data is held out, the validation score (accuracy / R^2) is recorded
  in ``validation_scores_`` each epoch, training stops when it has not improved by ``tol`` for
  ``n_iter_no_change`` epochs and the weights of the best epoch are put back. A ConvergenceWarning is
  issued when ``max_iter`` is reached first.
* ``batch_size="auto"`` is ``min(200, n_samples)``; samples are reshuffled every epoch (seeded by
  ``random_state``). ``device`` is ``"cpu"``, ``"cuda"`` or ``"auto"``; ``dtype`` float32 or float64.
* ``verbose``: passed to :meth:`fastbp.Trainer.fit` (a progress bar on a terminal).

Fitted estimators pickle (the trainer, which may hold GPU memory, is left out and rebuilt on demand;
the Adam / momentum state is kept) and run in joblib worker processes.
"""
from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .model import MLP
from .trainer import Trainer

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "sigmoid": "sigmoid", "tanh": "tanh",
                "relu": "relu", "leaky_relu": "leaky_relu"}


class InvalidParameterError(ValueError, TypeError):
    """A constructor parameter has a value the estimator cannot use (a ValueError and a TypeError, as
    scikit-learn's own InvalidParameterError, which lives in a private module)."""


def _real(low, high, closed):
    """A check: a real number (not a bool) in the interval low..high, ``closed`` one of left/right/both/neither."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, Real):
            return False
        above = value >= low if closed in ("left", "both") else value > low
        below = high is None or (value <= high if closed in ("right", "both") else value < high)
        return above and below
    left = "[" if closed in ("left", "both") else "("
    right = "]" if closed in ("right", "both") and high is not None else ")"
    return check, f"a float in the range {left}{low}, {'inf' if high is None else high}{right}"


def _integer(low):
    return (lambda value: isinstance(value, Integral) and not isinstance(value, bool) and value >= low,
            f"an int in the range [{low}, inf)")


def _options(*names):
    return (lambda value: isinstance(value, str) and value in names, f"a str among {sorted(names)}")


def _boolean():
    return (lambda value: isinstance(value, (bool, np.bool_)), "an instance of 'bool'")


def _hidden_layer_sizes(value):
    if isinstance(value, Integral) and not isinstance(value, bool):
        return value >= 1
    return hasattr(value, "__len__") and not isinstance(value, str)


def _random_state(value):
    return value is None or (isinstance(value, Integral) and not isinstance(value, bool)) or \
        isinstance(value, np.random.RandomState)


# What each constructor parameter may be: (check, description) pairs, any of which may match.
_PARAMETER_RULES = {
    "hidden_layer_sizes": [(_hidden_layer_sizes, "an array-like or an int in the range [1, inf)")],
    "activation": [_options(*_ACTIVATIONS)],
    "solver": [_options("sgd", "adam")],
    "alpha": [_real(0, None, "left")],
    "batch_size": [_options("auto"), _integer(1)],
    "learning_rate_init": [_real(0, None, "neither")],
    "max_iter": [_integer(1)],
    "random_state": [(_random_state, "an int, a numpy.random.RandomState instance or None")],
    "tol": [_real(0, None, "left")],
    "verbose": [(lambda v: isinstance(v, (bool, np.bool_, Integral)), "an int or a bool")],
    "warm_start": [_boolean()],
    "momentum": [_real(0, 1, "both")],
    "nesterovs_momentum": [_boolean()],
    "early_stopping": [_boolean()],
    "validation_fraction": [_real(0, 1, "neither")],
    "beta_1": [_real(0, 1, "left")],
    "beta_2": [_real(0, 1, "left")],
    "epsilon": [_real(0, None, "neither")],
    "n_iter_no_change": [_integer(1)],
    "device": [_options("cpu", "cuda", "auto")],
    "dtype": [_options("float32", "float64")],
}


class _BaseMLP(BaseEstimator):
    """Shared fit machinery; see :class:`MLPClassifier` and :class:`MLPRegressor`."""

    def _validate_params(self):
        """Every constructor parameter checked against _PARAMETER_RULES, as scikit-learn's estimators do at fit:
        an InvalidParameterError names the parameter, what it may be and what came."""
        for name, value in self.get_params(deep=False).items():
            rules = _PARAMETER_RULES[name]
            if not any(check(value) for check, _ in rules):
                expected = " or ".join(description for _, description in rules)
                raise InvalidParameterError(f"The {name!r} parameter of {type(self).__name__} must be {expected}. "
                                            f"Got {value!r} instead.")

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, random_state=None, tol=1e-4,
                 verbose=False, warm_start=False, momentum=0.9, nesterovs_momentum=True, early_stopping=False,
                 validation_fraction=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10,
                 device="cpu", dtype="float32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.device = device
        self.dtype = dtype

    # -- hooks of the subclasses ----------------------------------------------------------------------------
    _loss = "mse"
    _loss_scale = 1.0  # fastbp's loss gradient / scikit-learn's

    def _encode_targets(self, y, *, first: bool, classes=None):  # pragma: no cover - overridden
        raise NotImplementedError

    def _validation_score(self, trainer, X_val, y_val) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- building blocks ------------------------------------------------------------------------------------
    def _hidden_sizes(self) -> list:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, (Integral, np.integer)):
            sizes = [sizes]
        sizes = [int(s) for s in sizes]
        if any(s < 1 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {self.hidden_layer_sizes}.")
        return sizes

    def _batch(self, n: int) -> int:
        if self.batch_size == "auto":
            return min(200, n)
        if self.batch_size > n:
            warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                          UserWarning, stacklevel=3)
        return max(1, min(int(self.batch_size), n))

    def _new_trainer(self, n_features: int, n_outputs: int, batch: int, seed: int) -> Trainer:
        dtype = np.float32 if self.dtype == "float32" else np.float64
        model = MLP([n_features, *self._hidden_sizes(), n_outputs], _ACTIVATIONS[self.activation], dtype=dtype,
                    seed=seed)
        return self._make_trainer(model, batch, seed)

    def _make_trainer(self, model: MLP, batch: int, seed: int | None) -> Trainer:
        weight_decay = self._loss_scale * self.alpha / batch
        if self.solver == "sgd":
            return Trainer(model, loss=self._loss, optimizer="sgd", lr=self.learning_rate_init / self._loss_scale,
                           momentum=self.momentum, nesterov=bool(self.nesterovs_momentum and self.momentum > 0),
                           weight_decay=weight_decay, batch_size=batch, device=self.device, seed=seed)
        return Trainer(model, loss=self._loss, optimizer="adam", lr=self.learning_rate_init,
                       betas=(self.beta_1, self.beta_2), eps=self.epsilon, weight_decay=weight_decay,
                       batch_size=batch, device=self.device, seed=seed)

    def _trainer(self) -> Trainer:
        """The fitted trainer; rebuilt from the model and the trainer's state after unpickling."""
        if getattr(self, "_trainer_", None) is None:
            trainer = self._make_trainer(self.model_, self._batch_size_, self._seed_)
            trainer.load_state_dict(self._trainer_state_ | {"model": self.model_.state_dict()})
            self._trainer_ = trainer
        return self._trainer_

    def __getstate__(self):
        state = super().__getstate__().copy()
        trainer = state.pop("_trainer_", None)
        if trainer is not None:  # what the trainer knows beyond the model: optimizer state, clocks, shuffling RNG
            trainer_state = trainer.state_dict()
            del trainer_state["model"]  # pickled once, as model_
            state["_trainer_state_"] = trainer_state
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._trainer_ = None

    @property
    def coefs_(self) -> list:
        """Weight matrices, ``coefs_[l]`` of shape ``(n_units[l], n_units[l + 1])`` (as scikit-learn's)."""
        check_is_fitted(self, "model_")
        return self.model_.weights

    @property
    def intercepts_(self) -> list:
        """Bias vectors, ``intercepts_[l]`` of shape ``(n_units[l + 1],)``."""
        check_is_fitted(self, "model_")
        return self.model_.biases

    @property
    def n_layers_(self) -> int:
        check_is_fitted(self, "model_")
        return len(self.model_.sizes)

    # -- training -------------------------------------------------------------------------------------------
    def _fit(self, X, y, *, incremental: bool, classes=None):
        first = not ((incremental or self.warm_start) and hasattr(self, "model_"))
        X, y = validate_data(self, X, y, reset=first, dtype=(np.float64, np.float32), multi_output=True,
                             y_numeric=not is_classifier(self))
        Y = self._encode_targets(y, first=first, classes=classes)
        n = X.shape[0]
        if first:
            self._seed_ = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
            self._batch_size_ = self._batch(n)
            self._trainer_ = self._new_trainer(X.shape[1], Y.shape[1] if Y.ndim == 2 else self.n_outputs_,
                                               self._batch_size_, self._seed_)
            self.model_ = self._trainer_.model
            self.loss_curve_ = []
            self.n_iter_ = 0
            self.t_ = 0
            self._no_improvement_count = 0
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None
        trainer = self._trainer()
        trainer.batch_size = self._batch_size_ = self._batch(n)

        if incremental:
            history = trainer.fit(X, Y, epochs=1, verbose=self.verbose)
            self._after_epochs(history.loss, n)
            if self.best_loss_ is not None:
                self.best_loss_ = min(self.best_loss_, self.loss_curve_[-1])
            return self

        early = self.early_stopping
        validation = None
        if early:
            stratify = y if is_classifier(self) else None
            X, X_val, Y, y_val = train_test_split(X, Y, random_state=self._seed_, test_size=self.validation_fraction,
                                                  stratify=stratify)
            validation = (X_val, y_val)
            if self.validation_scores_ is None:
                self.validation_scores_ = []
                self.best_validation_score_ = -np.inf
            self.best_loss_ = None
            best = [None]
        self._no_improvement_count = 0

        def stopping_rule(trainer, history) -> bool:
            # scikit-learn's _update_no_improvement_count, called once per epoch.
            self._after_epochs(history.loss[-1:], X.shape[0])
            if early:
                score = self._validation_score(trainer, *validation)
                self.validation_scores_.append(score)
                if score < self.best_validation_score_ + self.tol:
                    self._no_improvement_count += 1
                else:
                    self._no_improvement_count = 0
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    # Callbacks run on a model that fit has brought up to date (Trainer.fit's contract).
                    best[0] = trainer.model.flat_parameters()
            else:
                loss = self.loss_curve_[-1]
                if loss > self.best_loss_ - self.tol:
                    self._no_improvement_count += 1
                else:
                    self._no_improvement_count = 0
                self.best_loss_ = min(self.best_loss_, loss)
            return self._no_improvement_count > self.n_iter_no_change

        history = trainer.fit(X, Y, epochs=self.max_iter, callbacks=[stopping_rule], verbose=self.verbose)
        if early and best[0] is not None:
            trainer.model.set_flat_parameters(best[0])
        if history.stop_reason == "epochs" and len(history.loss) == self.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                          "optimization hasn't converged yet.", ConvergenceWarning, stacklevel=3)
        return self

    def _after_epochs(self, losses, n: int) -> None:
        for loss in losses:
            self.loss_curve_.append(float(loss) / self._loss_scale)  # in scikit-learn's units
            self.n_iter_ += 1
            self.t_ += n

    def _predict_raw(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return np.asarray(self._trainer().predict(X), dtype=np.float64)

    def fit(self, X, y):
        """Fit the network to ``X`` (n_samples, n_features) and ``y`` (n_samples,) or (n_samples, n_outputs).

        Returns ``self``. Runs up to ``max_iter`` epochs; see the module docstring for the stopping rules.
        """
        self._validate_params()
        return self._fit(X, y, incremental=False)


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by fastbp (softmax cross-entropy), scikit-learn's API.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default (100,)
        Widths of the hidden layers.
    activation : {"identity", "logistic", "tanh", "relu"}, default "relu"
        Hidden-layer activation ("sigmoid" and "leaky_relu" also accepted).
    solver : {"adam", "sgd"}, default "adam"
    alpha : float, default 1e-4
        L2 strength, scikit-learn's meaning (see the module docstring for how it maps to weight decay).
    batch_size : int or "auto", default "auto" (``min(200, n_samples)``)
    learning_rate_init : float, default 1e-3
    max_iter : int, default 200
        Epochs at most.
    random_state : int, RandomState or None
        Seeds the initial weights, the shuffling and the validation split.
    tol, n_iter_no_change, early_stopping, validation_fraction :
        scikit-learn's stopping rules (see the module docstring).
    verbose : bool or int, default False
        Progress output of :meth:`fastbp.Trainer.fit` (``True``: a bar on a terminal, lines otherwise).
    warm_start : bool, default False
        Continue from the previous fit's weights and optimizer state.
    momentum, nesterovs_momentum : SGD momentum (``solver="sgd"``).
    beta_1, beta_2, epsilon : Adam's settings (``solver="adam"``).
    device : {"cpu", "cuda", "auto"}, default "cpu"
    dtype : {"float32", "float64"}, default "float32"

    Attributes
    ----------
    classes_ : ndarray (n_classes,)
    loss_curve_ : list of float, the mean training loss of each epoch (cross-entropy, no penalty term)
    validation_scores_ : list of float or None, held-out accuracy per epoch (``early_stopping`` only)
    best_validation_score_ : float or None; best_loss_ : float or None
    n_iter_ : int, epochs run; t_ : int, training samples seen
    coefs_, intercepts_ : lists of ndarray, the weights ``(n_in, n_out)`` and biases of each layer
    n_features_in_ : int; n_outputs_ : int (``n_classes``)

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from fastbp.sklearn import MLPClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=30, random_state=0).fit(X / 16, y)
    >>> clf.predict_proba(X[:3] / 16).shape
    (3, 10)
    >>> bool(clf.score(X / 16, y) > 0.9)
    True
    """

    _loss = "softmax_cross_entropy"
    _loss_scale = 1.0

    def _encode_targets(self, y, *, first: bool, classes=None):
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if first:
            self.classes_ = unique_labels(y) if classes is None else unique_labels(np.asarray(classes))
            self.n_outputs_ = len(self.classes_)
        elif classes is not None and not np.array_equal(unique_labels(np.asarray(classes)), self.classes_):
            raise ValueError(f"`classes={list(classes)}` is not the same as on the first call to partial_fit "
                             f"({list(self.classes_)})")
        unknown = np.setdiff1d(unique_labels(y), self.classes_)
        if unknown.size:
            raise ValueError(f"y has labels {list(unknown)} that are not in classes_ {list(self.classes_)}")
        ids = np.searchsorted(self.classes_, y).astype(np.int64)
        Y = np.zeros((len(ids), self.n_outputs_), dtype=np.float32 if self.dtype == "float32" else np.float64)
        Y[np.arange(len(ids)), ids] = 1
        return Y

    def _validation_score(self, trainer, X_val, Y_val) -> float:
        # Called from a fit callback, where the model is current: predict is exact (and O(parameters) of
        # copying per epoch, small beside the epoch).
        proba = trainer.predict(X_val)
        return float(accuracy_score(Y_val.argmax(axis=1), proba.argmax(axis=1)))

    def partial_fit(self, X, y, classes=None):
        """One epoch over ``X``, ``y``; ``classes`` (all labels) is required on the first call."""
        if not hasattr(self, "model_"):
            self._validate_params()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit.")
            return self._fit(X, y, incremental=True, classes=classes)
        return self._fit(X, y, incremental=True, classes=classes)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``, columns in the order of ``classes_``."""
        proba = self._predict_raw(X)
        proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax rows renormalised in float64
        return proba

    def predict_log_proba(self, X) -> np.ndarray:
        """``log(predict_proba(X))``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each row of ``X``, shape ``(n_samples,)``, labels from ``classes_``."""
        check_is_fitted(self, "model_")
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by fastbp (mean squared error), scikit-learn's API.

    Parameters are those of :class:`MLPClassifier`. ``y`` is ``(n_samples,)`` or ``(n_samples, n_outputs)``;
    ``predict`` returns ``(n_samples,)`` when there is one output. With ``solver="sgd"`` the rate is
    halved to match scikit-learn's half-squared-error steps (module docstring). ``loss_curve_`` holds
    scikit-learn's squared error ``mean((out - y)**2) / 2``; ``validation_scores_`` holds R^2.

    Examples
    --------
    >>> import numpy as np
    >>> from fastbp.sklearn import MLPRegressor
    >>> X = np.linspace(-1, 1, 200).reshape(-1, 1); y = np.sin(3 * X).ravel()
    >>> reg = MLPRegressor(hidden_layer_sizes=(32,), activation="tanh", learning_rate_init=0.02,
    ...                    max_iter=500, n_iter_no_change=50, random_state=0).fit(X, y)
    >>> reg.predict(X[:2]).shape
    (2,)
    >>> bool(reg.score(X, y) > 0.9)
    True
    """

    _loss = "mse"
    _loss_scale = 2.0

    def _encode_targets(self, y, *, first: bool, classes=None):
        y = np.asarray(y)
        Y = y.reshape(-1, 1) if y.ndim == 1 else y
        if first:
            self.n_outputs_ = Y.shape[1]
        elif Y.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {Y.shape[1]} outputs; this regressor was fitted with {self.n_outputs_}")
        return Y.astype(np.float32 if self.dtype == "float32" else np.float64)

    def _validation_score(self, trainer, X_val, Y_val) -> float:
        pred = trainer.predict(X_val)
        return float(r2_score(Y_val, pred))

    def partial_fit(self, X, y):
        """One epoch over ``X``, ``y`` (the first call starts a new network)."""
        if not hasattr(self, "model_"):
            self._validate_params()
        return self._fit(X, y, incremental=True)

    def predict(self, X) -> np.ndarray:
        """Predictions ``(n_samples,)`` for one output, ``(n_samples, n_outputs)`` otherwise."""
        pred = self._predict_raw(X)
        return pred.ravel() if pred.shape[1] == 1 else pred

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
