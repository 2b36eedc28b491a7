"""scikit-learn estimators backed by fastbp: :class:`MLPClassifier` and :class:`MLPRegressor`.

A drop-in for scikit-learn 1.9's ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``: the same
constructor parameters (names, order, meanings, defaults), the same fitted attributes, methods, warnings,
errors and printed lines; only the forward / backward passes and the optimizer steps run in fastbp's compiled
kernels. Change the import and keep the code::

    from fastbp.sklearn import MLPClassifier   # was: from sklearn.neural_network import MLPClassifier

Needs the optional extra ``sklearn`` (``pip install -e '.[sklearn]'`` in a clone; ``import fastbp`` alone never imports
scikit-learn). Two parameters are fastbp's own: ``device`` ("cpu", "cuda", "auto") and ``dtype`` (None: the
training dtype follows the input as in scikit-learn; "float32" / "float64" force one).

What is the same as scikit-learn
--------------------------------
* Solvers. ``"sgd"`` and ``"adam"`` run fastbp's Trainer (torch's SGD / Adam update rules, which are
  scikit-learn's up to the Adam epsilon noted below); ``"lbfgs"`` is ``scipy.optimize.minimize(method=
  "L-BFGS-B")`` with scikit-learn's options (``maxiter=max_iter``, ``maxfun=max_fun``, ``gtol=tol``) on
  fastbp's compiled loss and gradient over the whole data (``Trainer.loss_and_grads``), with scikit-learn's
  penalty ``alpha / (2 n) * sum ||W||^2`` (weights only) and its gradient added on the host.
* Outputs and losses. Multiclass: softmax and log loss. Binary: ONE logistic output (``n_outputs_ == 1``,
  ``out_activation_ == "logistic"``, ``coefs_[-1]`` of shape (h, 1)), ``predict_proba`` with two columns.
  Multilabel (an indicator matrix): one logistic output per label. Regression: identity outputs, any
  number of them, scikit-learn's half squared error. fastbp's losses are means over all output elements
  (PyTorch's reduction="mean"); the estimators rescale losses, gradients, learning rates, weight decay and
  Adam's epsilon so that every quantity is in scikit-learn's units (``loss_``, ``loss_curve_``, the ``tol``
  rules, the steps taken). For multi-output regression that includes scikit-learn's convention of a loss
  averaged over the outputs with a gradient summed over them (lbfgs sees exactly scikit-learn's pair).
* Initial weights and the validation split. The weights are drawn exactly as scikit-learn draws them
  (Glorot uniform, factor 2 for logistic, biases too) from ``check_random_state(random_state)``, and the
  ``early_stopping`` split is ``train_test_split`` with that same random state afterwards. So for the same
  ``random_state`` the initial ``coefs_`` and the held-out rows are scikit-learn's own (stratified only when
  scikit-learn stratifies: single-output classification, i.e. binary targets; scikit-learn 1.9 does not
  stratify multiclass or multilabel splits).
* Stopping, schedules, messages: ``tol`` / ``n_iter_no_change`` (``np.inf`` runs ``max_iter`` epochs),
  ``early_stopping`` (best weights restored; a fit whose weights overflow does not raise but, as scikit-learn's
  since its issue 29504, records NaN epochs up to ``max_iter`` and keeps the best weights it saw),
  ``learning_rate="adaptive"`` (rate / 5, "Setting learning
  rate to ..."), ``"invscaling"`` (scikit-learn changes the rate at the end of each epoch to
  ``learning_rate_init / (t_ + 1) ** power_t``, ``t_`` the samples seen: a per-epoch rule, followed exactly),
  ``verbose`` lines on stdout ("Iteration 1, loss = 0.69314718", "Validation score: ...", the "did not
  improve" messages), the ConvergenceWarning texts (stochastic solvers and lbfgs), ``partial_fit`` (one
  epoch; ``n_iter_`` is 1 after it, as in scikit-learn; the classifier's needs ``classes`` first and is
  absent for lbfgs), ``warm_start`` (weights kept, optimizer state reset, as in scikit-learn),
  ``shuffle=False`` (mini-batches in row order), ``batch_size="auto"`` = ``min(200, n_samples)``.
* When the rate changes under momentum (invscaling, adaptive), scikit-learn's velocity keeps the old rate's
  steps; torch's momentum buffer is multiplied by the new rate. The estimator rescales the buffer by
  ``old_rate / new_rate`` at each change (``Trainer.scale_momentum``), which makes the two updates equal.
* Inputs: dense arrays of any numeric dtype (float32 trains in float32, everything else in float64, as
  scikit-learn), scipy.sparse CSR / CSC matrices, pandas DataFrames (``feature_names_in_``).
* Attributes: ``coefs_``, ``intercepts_`` (readable, settable as a whole list or item by item, and editable
  in place: they are the model's own arrays; shapes are checked; assigned on an estimator never fitted, with
  ``n_features_in_`` and ``n_outputs_``, as in scikit-learn's worked example, they are where the next
  ``partial_fit`` or warm-started ``fit`` starts, the architecture theirs), ``loss_``, ``best_loss_``,
  ``loss_curve_``, ``validation_scores_``, ``best_validation_score_``, ``t_``, ``n_iter_``, ``n_layers_``,
  ``n_outputs_``, ``out_activation_``, ``classes_``, ``n_features_in_``, ``feature_names_in_``. As in
  scikit-learn, lbfgs fits set ``loss_`` and ``n_iter_`` but no ``loss_curve_``.

Where fastbp differs, and why
-----------------------------
* Shuffling. With ``shuffle=True`` the mini-batch orders come from fastbp's own random stream (seeded from
  ``random_state``), not from scikit-learn's, so the batches differ from scikit-learn's run and results
  agree statistically, not bit for bit. With ``shuffle=False`` the batches are scikit-learn's (row order),
  and an sgd fit with ``alpha=0`` follows scikit-learn's trajectory to rounding (tests/test_sklearn_compat.py).
  Both run through one ``Trainer.fit`` (``shuffle=True`` or ``False``), one compiled call per epoch.
* Adam's epsilon. scikit-learn computes ``lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + eps)``;
  fastbp (torch) computes ``lr * m_hat / (sqrt(v_hat) + eps)``. They are the same update with
  scikit-learn's eps being ``eps / sqrt(1 - beta_2^t)`` in torch's form: 32x larger at the first step,
  within 1.1x after 2000 steps; it matters only where gradients are of order epsilon.
* L2 penalty (``alpha``) in sgd / adam. fastbp's weight decay adds ``wd * p`` to the gradient of every
  parameter; the estimators use ``wd = alpha / batch_size`` (in scikit-learn's units), the pull scikit-learn
  puts on the weights, and the biases get the same pull (scikit-learn leaves them alone). The last, smaller
  batch of an epoch gets ``alpha / batch_size`` rather than scikit-learn's ``alpha / n_last``. The penalty
  term inside ``loss_curve_``: scikit-learn adds ``alpha / 2 ||W_b||^2 / n`` for each batch's starting
  weights ``W_b``; fastbp has the squared norm at the start and end of each epoch only and sums the batches'
  terms as if it changed linearly in between (exact for a one-batch epoch; within 1e-3 of scikit-learn's
  loss in tests/test_sklearn_compat.py). lbfgs is exact.
* float32. The kernels sum in their own (fixed) order, so float32 results differ from scikit-learn's float32
  results by rounding; prediction of float64 input by a float32-trained model is computed in float32 (and
  returned as float64, as scikit-learn returns it).
* lbfgs works in float64 (unless ``dtype="float32"``), which is what scikit-learn ends up doing too: its
  lbfgs writes scipy's float64 vector into ``coefs_``. The flat parameter order is fastbp's
  (W0, b0, W1, b1, ...) rather than scikit-learn's (all weights, then all biases); L-BFGS is invariant to a
  permutation of the coordinates, so the iterates are the same up to rounding.
* ``verbose >= 2`` also shows fastbp's progress line per epoch on stderr (stdout carries scikit-learn's
  lines for any true ``verbose``).
* ``activation`` also accepts fastbp's ``"sigmoid"`` (= logistic) and ``"leaky_relu"``.
* The regressor's ``multi_output`` estimator tag is True (it supports several outputs; scikit-learn 1.9
  leaves its tag False).
* ``sample_weight`` (scikit-learn 1.9's definition: each batch's loss is the weighted mean of its rows'
  losses). Equal weights only rescale ``alpha`` and are exact. Unequal weights run ``Trainer.fit(sample_weight=)``:
  lbfgs follows scikit-learn to rounding, and so do in-order (``shuffle=False``) sgd/adam with ``alpha=0``;
  the L2 term of sgd/adam uses the mean weight (scikit-learn divides by each batch's own weight sum, which
  fastbp's one weight decay per fit cannot), and ``loss_curve_`` is the weighted mean over the epoch's rows
  (scikit-learn averages the batches' weighted means by their row counts). Early stopping splits the weights
  with the rows and scores the validation set weighted, as scikit-learn. A batch whose weights are all 0
  gives a zero gradient, and the optimizer still steps (scikit-learn divides by 0 there and its weights
  become NaN). Both devices take sample weights.
* ``MLPRegressor(loss="poisson")``: scikit-learn's half Poisson deviance with the exp output
  (``out_activation_ == "exp"``), trained on fastbp's ``"poisson"`` loss (PyTorch's ``PoissonNLLLoss``,
  ``exp(z) - y z``); ``loss_`` and ``loss_curve_`` add the deviance's constant ``y log y - y`` back, so they
  are scikit-learn's numbers. Negative targets are refused with a ValueError (scikit-learn's loss is NaN).

Memory: sparse input is converted to a dense array of the training dtype for ``fit`` (n_samples x
n_features numbers); ``predict`` converts 4096 rows at a time.

Fitted estimators pickle (the trainer, which may hold GPU memory, is left out and rebuilt on demand; the
Adam / momentum state is kept) and run in joblib worker processes.
"""
from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import scipy.optimize
import scipy.sparse
from scipy.special import xlogy
from sklearn import config_context
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from ._blas_free import sum_of_products, sum_of_squares
from .model import MLP
from .progress import ProgressBar
from .trainer import History, NonFiniteLossError, Trainer

__all__ = ["MLPClassifier", "MLPRegressor"]

_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "sigmoid": "sigmoid", "tanh": "tanh",
                "relu": "relu", "leaky_relu": "leaky_relu"}
_STOCHASTIC_SOLVERS = ("sgd", "adam")
_FASTBP_LOSS = {"softmax": "softmax_cross_entropy", "logistic": "binary_cross_entropy", "identity": "mse",
                "exp": "poisson"}
_PREDICT_ROWS = 4096  # rows of a sparse input converted to dense at a time by predict
_NON_FINITE = ("Solver produced non-finite parameter weights. The input data may contain large values and need to "
               "be preprocessed.")


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


def _dtype_option(value):
    return value is None or (isinstance(value, str) and value in ("float32", "float64")) or \
        value in (np.float32, np.float64)


# What each constructor parameter may be: (check, description) pairs, any of which may match (scikit-learn
# 1.9's _parameter_constraints, plus fastbp's device and dtype).
_PARAMETER_RULES = {
    "loss": [_options("squared_error", "poisson")],
    "hidden_layer_sizes": [(_hidden_layer_sizes, "an array-like or an int in the range [1, inf)")],
    "activation": [_options(*_ACTIVATIONS)],
    "solver": [_options("lbfgs", "sgd", "adam")],
    "alpha": [_real(0, None, "left")],
    "batch_size": [_options("auto"), _integer(1)],
    "learning_rate": [_options("constant", "invscaling", "adaptive")],
    "learning_rate_init": [_real(0, None, "neither")],
    "power_t": [_real(0, None, "left")],
    "max_iter": [_integer(1)],
    "shuffle": [_boolean()],
    "random_state": [(_random_state, "an int, a numpy.random.RandomState instance or None")],
    "tol": [_real(0, None, "left")],
    "verbose": [(lambda v: isinstance(v, (bool, np.bool_, Integral)), "an int or a bool")],
    "warm_start": [_boolean()],
    "momentum": [_real(0, 1, "both")],
    "nesterovs_momentum": [_boolean()],
    "early_stopping": [_boolean()],
    "validation_fraction": [_real(0, 1, "left")],
    "beta_1": [_real(0, 1, "left")],
    "beta_2": [_real(0, 1, "left")],
    "epsilon": [_real(0, None, "neither")],
    "n_iter_no_change": [_integer(1), (lambda v: isinstance(v, Real) and not isinstance(v, bool) and v == np.inf,
                                       "a float among {inf}")],
    "max_fun": [_integer(1)],
    "device": [_options("cpu", "cuda", "auto")],
    "dtype": [(_dtype_option, "None, 'float32' or 'float64'")],
}


def _check_sample_weight(sample_weight, n_samples: int):
    """None, the one value all weights share (a float: they only rescale alpha), or the weights themselves as a
    float64 array when they differ; scikit-learn's shape and value checks and messages."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, Real) and not isinstance(sample_weight, bool):
        weights = np.full(n_samples, float(sample_weight))
    else:
        weights = np.asarray(sample_weight)
        if weights.dtype.kind not in "biuf":
            try:
                weights = weights.astype(np.float64)
            except (TypeError, ValueError) as error:
                raise ValueError(f"sample_weight must be numeric ({error})") from None
        weights = weights.astype(np.float64, copy=False)
        if weights.ndim != 1:
            raise ValueError("Sample weights must be 1D array or scalar")
        if weights.shape != (n_samples,):
            raise ValueError(f"sample_weight.shape == {weights.shape}, expected {(n_samples,)}!")
    if not np.isfinite(weights).all():
        raise ValueError("Input sample_weight contains NaN or infinity.")
    if n_samples and not (weights == weights[0]).all():
        if weights.min() < 0:
            raise ValueError("Negative values in data passed to sample_weight")
        return np.array(weights, dtype=np.float64)  # a copy: the caller's array is never changed
    value = float(weights[0]) if n_samples else 1.0
    if value == 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")
    if value < 0:
        raise ValueError("Negative values in data passed to sample_weight")
    return value


def _dense(X, dtype) -> np.ndarray:
    """X (dense or scipy.sparse) as a C-contiguous array of dtype (a copy only where needed)."""
    if scipy.sparse.issparse(X):
        return np.ascontiguousarray(X.astype(dtype).toarray())
    return np.ascontiguousarray(X, dtype=dtype)


# Where coefs_ / intercepts_ assigned on a never-fitted estimator are kept until a fit starts from them.
_BY_HAND = {"coefs_": "_coefs_set_by_hand", "intercepts_": "_intercepts_set_by_hand"}


class _ParameterList(list):
    """``coefs_`` / ``intercepts_``: the model's own arrays; ``est.coefs_[l] = array`` copies into them."""

    def __init__(self, arrays, name: str):
        super().__init__(arrays)
        self._name = name

    def __setitem__(self, index, value):
        if isinstance(index, slice):
            raise TypeError(f"assign {self._name} one array at a time, or the whole list")
        target = list.__getitem__(self, index)
        _copy_parameter(target, value, f"{self._name}[{index}]")


def _copy_parameter(target: np.ndarray, value, name: str) -> None:
    value = np.asarray(value)
    if value.shape != target.shape:
        raise ValueError(f"{name} must have shape {target.shape}; got {value.shape}")
    if not np.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    target[...] = value


class _BaseMLP(BaseEstimator):
    """Shared machinery; see :class:`MLPClassifier` and :class:`MLPRegressor`."""

    # -- hooks of the subclasses ----------------------------------------------------------------------------
    def _validate_input(self, X, y, incremental: bool, reset: bool):  # pragma: no cover - overridden
        raise NotImplementedError

    def _score_validation(self, pred, y_val, sample_weight=None) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def _out_activation(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- parameters ------------------------------------------------------------------------------------------
    def _validate_params(self):
        """Every constructor parameter checked against _PARAMETER_RULES, as scikit-learn's estimators do at fit:
        an InvalidParameterError names the parameter, what it may be and what came."""
        for name, value in self.get_params(deep=False).items():
            rules = _PARAMETER_RULES[name]
            if not any(check(value) for check, _ in rules):
                expected = " or ".join(description for _, description in rules)
                raise InvalidParameterError(f"The {name!r} parameter of {type(self).__name__} must be {expected}. "
                                            f"Got {value!r} instead.")

    def _hidden_sizes(self) -> list:
        sizes = self.hidden_layer_sizes
        if not hasattr(sizes, "__iter__"):
            sizes = [sizes]
        sizes = list(sizes)
        if np.any(np.array(sizes) <= 0):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {sizes}.")
        return [int(s) for s in sizes]

    def _training_dtype(self, X_dtype) -> np.dtype:
        if self.dtype is not None:
            return np.dtype(self.dtype)
        return np.dtype(np.float64) if self.solver == "lbfgs" else np.dtype(X_dtype)

    # -- loss units ------------------------------------------------------------------------------------------
    def _ratios(self) -> tuple:
        """(loss ratio, gradient ratio): scikit-learn's loss and gradient over fastbp's for the same outputs."""
        k = self.n_outputs_
        if self.out_activation_ == "softmax":
            return 1.0, 1.0
        if self.out_activation_ in ("logistic", "exp"):  # summed over the outputs (log loss, half deviance)
            return float(k), float(k)
        return 0.5, k / 2.0  # half squared error, averaged over outputs; its gradient summed over them

    def _loss_offset(self, Y, sample_weight=None) -> float:
        """What scikit-learn's loss over the rows Y (n, k) adds to ratio * fastbp's: for poisson, the (weighted)
        mean of each row's sum_j (y log y - y), the part of the half Poisson deviance that does not depend on
        the network (fastbp's loss, as PyTorch's PoissonNLLLoss, leaves it out); 0 for the other losses."""
        if self.out_activation_ != "exp" or len(Y) == 0:
            return 0.0
        Y = np.asarray(Y, dtype=np.float64).reshape(len(Y), -1)
        rows = (xlogy(Y, Y) - Y).sum(axis=1)
        if sample_weight is None:
            return float(rows.mean())
        return float(np.average(rows, weights=np.asarray(sample_weight, dtype=np.float64)))

    # -- coefs_ and intercepts_ --------------------------------------------------------------------------------
    # On a fitted estimator they are the model's own arrays. Assigned on one that was never fitted (as in
    # scikit-learn's worked example, tests/test_mlp.py::test_fit: coefs_ = [0] * 2, then coefs_[0] = array, ...),
    # the list itself is kept, as scikit-learn keeps it, and becomes the starting point of the next partial_fit
    # or warm-started fit (_adopt_parameters_set_by_hand); a fit without warm_start draws new weights.
    @property
    def coefs_(self) -> list:
        """Weight matrices, ``coefs_[l]`` of shape ``(n_units[l], n_units[l + 1])``: the model's own arrays.
        Edit them in place, assign ``coefs_[l] = array`` or ``coefs_ = [arrays]`` (copied in, shape checked).
        Assigned before any fit, they are where the next ``partial_fit`` (or ``fit`` with ``warm_start``) starts."""
        if "model_" not in self.__dict__ and _BY_HAND["coefs_"] in self.__dict__:
            return self.__dict__[_BY_HAND["coefs_"]]
        check_is_fitted(self, "model_")
        return _ParameterList(self.model_.weights, "coefs_")

    @coefs_.setter
    def coefs_(self, arrays):
        self._set_parameters(arrays, "coefs_", self.model_.weights if hasattr(self, "model_") else None)

    @property
    def intercepts_(self) -> list:
        """Bias vectors, ``intercepts_[l]`` of shape ``(n_units[l + 1],)`` (settable like ``coefs_``)."""
        if "model_" not in self.__dict__ and _BY_HAND["intercepts_"] in self.__dict__:
            return self.__dict__[_BY_HAND["intercepts_"]]
        check_is_fitted(self, "model_")
        return _ParameterList(self.model_.biases, "intercepts_")

    @intercepts_.setter
    def intercepts_(self, arrays):
        self._set_parameters(arrays, "intercepts_", self.model_.biases if hasattr(self, "model_") else None)

    def _set_parameters(self, arrays, name: str, targets) -> None:
        if targets is None:  # never fitted: kept as given (checked when a fit starts from them)
            if isinstance(arrays, (str, bytes)) or not hasattr(arrays, "__iter__"):
                raise TypeError(f"{name} must be a list of arrays, one per layer; got {type(arrays).__name__}")
            self.__dict__[_BY_HAND[name]] = arrays if isinstance(arrays, list) else list(arrays)
            return
        arrays = list(arrays)
        if len(arrays) != len(targets):
            raise ValueError(f"{name} must be a list of {len(targets)} arrays; got {len(arrays)}")
        values = [np.asarray(a) for a in arrays]
        for layer, (target, value) in enumerate(zip(targets, values)):  # check all before changing any
            if value.shape != target.shape:
                raise ValueError(f"{name}[{layer}] must have shape {target.shape}; got {value.shape}")
        for layer, (target, value) in enumerate(zip(targets, values)):
            _copy_parameter(target, value, f"{name}[{layer}]")

    # -- the trainer -------------------------------------------------------------------------------------------
    def _trainer(self) -> Trainer:
        """The fitted trainer; rebuilt from the model and the trainer's state after unpickling."""
        if getattr(self, "_trainer_", None) is None:
            trainer = Trainer(self.model_, **self._trainer_settings_)
            state = getattr(self, "_trainer_state_", None)
            if state is not None:
                trainer.load_state_dict(state | {"model": self.model_.state_dict()})
            self._trainer_ = trainer
        return self._trainer_

    def _settings(self, batch: int | None, seed: int | None, alpha: float) -> dict:
        """Trainer settings giving scikit-learn's steps (see the module docstring for the units)."""
        _, g = self._ratios()
        loss = _FASTBP_LOSS[self.out_activation_]
        if self.solver == "lbfgs":
            return dict(loss=loss, optimizer="sgd", lr=1.0, batch_size=None, device=self.device, seed=seed)
        weight_decay = alpha / (batch * g)
        if self.solver == "sgd":
            return dict(loss=loss, optimizer="sgd", lr=self._lr_ * g, momentum=float(self.momentum),
                        nesterov=bool(self.nesterovs_momentum and self.momentum > 0), weight_decay=weight_decay,
                        batch_size=batch, device=self.device, seed=seed)
        return dict(loss=loss, optimizer="adam", lr=float(self.learning_rate_init),
                    betas=(float(self.beta_1), float(self.beta_2)), eps=float(self.epsilon) / g,
                    weight_decay=weight_decay, batch_size=batch, device=self.device, seed=seed)

    def _use_trainer(self, settings: dict, *, fresh: bool) -> Trainer:
        """The trainer for this fit: a new one (``fresh``: a new optimizer state, as scikit-learn makes a new
        optimizer for every fit), or the current one, rebuilt with its state when a setting changed (the weight
        decay follows the batch size and the sample weight of each partial_fit)."""
        if fresh or getattr(self, "_trainer_settings_", {}).get("optimizer") != settings["optimizer"]:
            self._trainer_settings_ = settings
            self._trainer_ = Trainer(self.model_, **settings)
            self._trainer_state_ = None
            return self._trainer_
        old = self._trainer()
        settings = settings | {"seed": self._trainer_settings_["seed"], "lr": self._trainer_settings_["lr"]}
        if settings != self._trainer_settings_:
            state = old.state_dict()
            trainer = Trainer(self.model_, **settings)
            trainer.load_state_dict(state)
            self._trainer_, self._trainer_settings_ = trainer, settings
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

    # -- fit -------------------------------------------------------------------------------------------------
    def _fit(self, X, y, sample_weight=None, incremental: bool = False):
        hidden = self._hidden_sizes()
        rows = getattr(X, "shape", (None,))[0]
        if sample_weight is not None and isinstance(rows, Integral):  # bad weights refused before any change
            _check_sample_weight(sample_weight, rows)
        # scikit-learn's rule: the weights are drawn anew unless coefs_ exist (fitted, or set by hand) and the
        # call continues from them (partial_fit, warm_start).
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        weight = _check_sample_weight(sample_weight, X.shape[0])
        weights = None
        if isinstance(weight, np.ndarray):  # unequal weights: passed to the Trainer, alpha as for their mean
            weights, weight = weight, float(weight.mean())
        alpha = float(self.alpha) if weight is None else float(self.alpha) / weight
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        if not first_pass and y.shape[1] != getattr(self, "n_outputs_", y.shape[1]):
            raise ValueError(f"y has {y.shape[1]} outputs; this estimator was fitted with {self.n_outputs_}")
        if not first_pass and "model_" not in self.__dict__:  # coefs_ set by hand: checked before any change
            self._adopt_parameters_set_by_hand(X.shape[1], y.shape[1], self._training_dtype(X.dtype))
        self.n_outputs_ = y.shape[1]
        layer_units = [X.shape[1], *hidden, self.n_outputs_]
        random_state = check_random_state(self.random_state)
        if first_pass:
            self._initialize(layer_units, self._training_dtype(X.dtype), random_state)
        if self.solver in _STOCHASTIC_SOLVERS:
            self._fit_stochastic(X, y, alpha, incremental, random_state, weights)
        else:
            self._fit_lbfgs(X, y, alpha, weights)
        if not np.isfinite(self.model_.flat_parameters()).all():
            raise ValueError(_NON_FINITE)
        return self

    def _initialize(self, layer_units: list, dtype: np.dtype, random_state) -> None:
        """scikit-learn's _initialize: counters, the output, and the initial weights drawn as scikit-learn
        draws them (Glorot uniform for weights and biases, in layer order, from random_state)."""
        model = self._new_model(layer_units, dtype)
        factor = 2.0 if self.activation in ("logistic", "sigmoid") else 6.0
        for layer in range(len(layer_units) - 1):
            fan_in, fan_out = layer_units[layer], layer_units[layer + 1]
            bound = np.sqrt(factor / (fan_in + fan_out))
            model.weights[layer][...] = random_state.uniform(-bound, bound, (fan_in, fan_out))
            model.biases[layer][...] = random_state.uniform(-bound, bound, fan_out)
        self._start_from(model, keep_given=False)

    def _new_model(self, layer_units: list, dtype) -> MLP:
        # One name per hidden layer: a network without hidden layers gets [] (MLP refuses an activation that
        # would have no effect; scikit-learn's estimator accepts and ignores it there).
        return MLP(layer_units, [_ACTIVATIONS[self.activation]] * (len(layer_units) - 2), dtype=dtype)

    def _start_from(self, model: MLP, keep_given: bool) -> None:
        """model_ becomes ``model``, with scikit-learn's counters and curves of a first fit; with ``keep_given``
        (weights set by hand) those already assigned by hand are kept, as scikit-learn's worked example sets
        them."""
        for stale in ("_trainer_", "_trainer_settings_", "_trainer_state_", *_BY_HAND.values()):
            self.__dict__.pop(stale, None)
        start = {"n_iter_": 0, "t_": 0, "n_layers_": len(model.sizes), "out_activation_": self._out_activation()}
        if self.solver in _STOCHASTIC_SOLVERS:
            start |= {"loss_curve_": [], "_no_improvement_count": 0}
            if self.early_stopping:
                start |= {"validation_scores_": [], "best_validation_score_": -np.inf, "best_loss_": None}
            else:
                start |= {"best_loss_": np.inf, "validation_scores_": None, "best_validation_score_": None}
        for name, value in start.items():
            if not (keep_given and name in self.__dict__):
                setattr(self, name, value)
        self.model_ = model
        self._best_parameters = model.flat_parameters()

    def _adopt_parameters_set_by_hand(self, n_features: int, n_outputs: int, dtype: np.dtype) -> None:
        """coefs_ and intercepts_ assigned on a never-fitted estimator (with n_features_in_ and n_outputs_, as
        scikit-learn's worked example does) become the model the next partial_fit / warm-started fit starts
        from, as in scikit-learn; the architecture is theirs. Checked first: nothing changes if they are
        refused."""
        given = {name: self.__dict__.get(key) for name, key in _BY_HAND.items()}
        missing = [name for name, arrays in given.items() if arrays is None]
        if missing:
            raise ValueError(f"{missing[0]} was not set: a fit starts from hand-set weights only when both coefs_ "
                             "and intercepts_ are set (one array per layer each)")
        try:
            coefs = [np.asarray(c, dtype=np.float64) for c in given["coefs_"]]
            intercepts = [np.asarray(b, dtype=np.float64) for b in given["intercepts_"]]
        except (TypeError, ValueError) as error:
            raise ValueError(f"coefs_ and intercepts_ must hold numeric arrays ({error})") from None
        if not coefs or len(coefs) != len(intercepts):
            raise ValueError(f"coefs_ and intercepts_ must hold one array per layer each; got {len(coefs)} and "
                             f"{len(intercepts)}")
        for layer, (w, b) in enumerate(zip(coefs, intercepts)):
            if w.ndim != 2:
                raise ValueError(f"coefs_[{layer}] must be a matrix (n_in, n_out); got shape {w.shape}")
            if layer and w.shape[0] != coefs[layer - 1].shape[1]:
                raise ValueError(f"coefs_[{layer}] must have {coefs[layer - 1].shape[1]} rows (the columns of "
                                 f"coefs_[{layer - 1}]); got shape {w.shape}")
            if b.shape != (w.shape[1],):
                raise ValueError(f"intercepts_[{layer}] must have shape {(w.shape[1],)}; got {b.shape}")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ValueError(f"coefs_[{layer}] or intercepts_[{layer}] contains NaN or inf")
        layer_units = [coefs[0].shape[0]] + [w.shape[1] for w in coefs]
        if layer_units[0] != n_features:
            raise ValueError(f"coefs_[0] has {layer_units[0]} rows, one per input feature; X has {n_features} "
                             "features")
        if layer_units[-1] != n_outputs:
            raise ValueError(f"coefs_[-1] has {layer_units[-1]} columns, one per output; y has {n_outputs} "
                             f"outputs{' (one logistic output for two classes)' if is_classifier(self) else ''}")
        for name, wanted in (("n_layers_", len(layer_units)), ("out_activation_", self._out_activation())):
            if name in self.__dict__ and getattr(self, name) != wanted:
                raise ValueError(f"{name}={getattr(self, name)!r} was set by hand, but these coefs_ and targets "
                                 f"make it {wanted!r}")
        model = self._new_model(layer_units, dtype)
        for layer, (w, b) in enumerate(zip(coefs, intercepts)):
            model.weights[layer][...] = w
            model.biases[layer][...] = b
        self._start_from(model, keep_given=True)

    # -- lbfgs -----------------------------------------------------------------------------------------------
    def _fit_lbfgs(self, X, y, alpha: float, sample_weights=None) -> None:
        model = self.model_
        trainer = self._use_trainer(self._settings(None, None, alpha), fresh=True)
        X = _dense(X, model.dtype)
        Y = np.ascontiguousarray(y, dtype=model.dtype)
        n = X.shape[0]
        r, g = self._ratios()
        offset = self._loss_offset(Y, sample_weights)
        if sample_weights is not None:  # scikit-learn's _backprop: the weighted mean loss, L2 term over sum(w)
            alpha, n = alpha * float(sample_weights.mean()), float(sample_weights.sum())
            sample_weights = sample_weights.astype(model.dtype)
        weight_mask = np.zeros(model.n_params)
        for layer in range(model.layout.n_layers):
            model.layout.views(weight_mask, layer)[0][...] = 1.0
        grad = np.empty(model.n_params)

        def loss_and_grad(x):
            if not np.isfinite(x).all():
                return np.inf, np.zeros_like(x)
            model.set_flat_parameters(x)
            loss, dweights, dbiases = trainer.loss_and_grads(X, Y, sample_weight=sample_weights)
            model.layout.pack(dweights, dbiases, grad)
            weights = x * weight_mask
            value = r * loss + offset + 0.5 * alpha * sum_of_products(weights, weights) / n
            return value, grad * g + (alpha / n) * weights

        iprint = 1 if (self.verbose is True or self.verbose >= 1) else -1
        old_scipy = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 15)
        options = {"maxfun": self.max_fun, "maxiter": self.max_iter, "gtol": self.tol}
        if old_scipy:  # scikit-learn passes iprint only where scipy still takes it
            options["iprint"] = iprint
        # L-BFGS-B's own vector operations over the P parameters are BLAS calls (scipy's OpenBLAS): above
        # 10000 numbers they wake its threads, which then spin while the next compiled loss_and_grads waits for
        # the cores they hold (fastbp._blas_free). One BLAS thread for the solve, process-wide and restored
        # after (threadpoolctl, scikit-learn's own tool for this): 100-128-5 float64, 40 iterations on 15000 rows,
        # 2.6-3.0 s -> 0.9-1.3 s on the 2-vCPU AMD EPYC Zen 4.
        with threadpool_limits(limits=1, user_api="blas"):
            result = scipy.optimize.minimize(loss_and_grad, model.flat_parameters().astype(np.float64),
                                             method="L-BFGS-B", jac=True, options=options)
        self.n_iter_ = _check_optimize_result(result, self.max_iter)
        self.loss_ = np.float64(result.fun)
        model.set_flat_parameters(result.x)

    # -- sgd and adam ------------------------------------------------------------------------------------------
    def _fit_stochastic(self, X, y, alpha: float, incremental: bool, random_state, weights=None) -> None:
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        fresh = not incremental or not hasattr(self, "_lr_")
        if fresh:
            self._lr_ = float(self.learning_rate_init)  # the optimizer's current rate, scikit-learn's units
        early = bool(self.early_stopping)
        if early:
            stratify = y if is_classifier(self) and self.n_outputs_ == 1 else None
            with config_context(skip_parameter_validation=True):  # as inside scikit-learn's fit: its messages
                if weights is None:
                    X_train, X_val, y_train, y_val = train_test_split(
                        X, y, random_state=random_state, test_size=self.validation_fraction, stratify=stratify)
                    w_train = w_val = None
                else:  # scikit-learn splits the weights with the rows (the same draws)
                    X_train, X_val, y_train, y_val, w_train, w_val = train_test_split(
                        X, y, weights, random_state=random_state, test_size=self.validation_fraction,
                        stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                                 "your dataset.")
            y_val = self._validation_targets(y_val)
            if self.validation_scores_ is None:  # a warm start that turned early stopping on
                self.validation_scores_, self.best_validation_score_ = [], -np.inf
        else:
            X_train, y_train, X_val, y_val = X, y, None, None
            w_train = w_val = weights
        n = X_train.shape[0]
        if self.batch_size == "auto":
            batch = min(200, n)
        else:
            if self.batch_size > n:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped",
                              stacklevel=4)
            batch = int(np.clip(self.batch_size, 1, n))
        seed = int(random_state.randint(np.iinfo(np.int32).max))
        trainer = self._use_trainer(self._settings(batch, seed, alpha), fresh=fresh)
        trainer.batch_size = batch
        dtype = self.model_.dtype
        X_train = _dense(X_train, dtype)
        Y_train = np.ascontiguousarray(y_train, dtype=dtype)
        if early:
            X_val = _dense(X_val, dtype)
        loop = _Epochs(self, trainer, alpha, n, batch, incremental, X_val, y_val, w_train, w_val)
        epochs = 1 if incremental else self.max_iter
        try:
            loop.run(X_train, Y_train, epochs, shuffle=bool(self.shuffle))
        except NonFiniteLossError:
            raise ValueError(_NON_FINITE) from None
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=4)
        finally:
            loop.close()
        if early:
            self.model_.set_flat_parameters(self._best_parameters)

    def _validation_targets(self, y_val):
        return y_val

    def _validation_score(self, trainer, X_val, y_val, sample_weight=None) -> float:
        pred = np.asarray(trainer.predict(X_val), dtype=np.float64)
        return self._score_validation(pred, y_val, sample_weight)

    # -- predict ---------------------------------------------------------------------------------------------
    def _forward(self, X) -> np.ndarray:
        """The network's output for X (validated): (n, n_outputs_), float64 unless X and the model are float32."""
        check_is_fitted(self, "model_")
        X = validate_data(self, X, accept_sparse=["csr", "csc"], reset=False)
        dtype = self.model_.dtype
        out_dtype = np.result_type(X.dtype, dtype) if X.dtype.kind == "f" else np.dtype(np.float64)
        trainer = self._trainer()
        if scipy.sparse.issparse(X):
            X = X.tocsr()
            parts = [trainer.predict(_dense(X[a:a + _PREDICT_ROWS], dtype))
                     for a in range(0, X.shape[0], _PREDICT_ROWS)]
            out = np.concatenate(parts) if parts else np.empty((0, self.n_outputs_), dtype)
        else:
            out = trainer.predict(_dense(X, dtype))
        out = np.asarray(out, dtype=out_dtype)
        if self.out_activation_ == "softmax":  # the kernels' float32 softmax rows, renormalised
            out /= out.sum(axis=1, keepdims=True)
        return out

    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y.

        Parameters
        ----------
        X : ndarray, sparse matrix or DataFrame of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), default=None
            Equal weights only, for now (see the module docstring).

        Returns
        -------
        self
        """
        self._validate_params()
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    def _check_solver(self) -> bool:
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(f"partial_fit is only available for stochastic optimizers. {self.solver} is not "
                                 "stochastic.")
        return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class _Epochs:
    """scikit-learn's epoch loop (_fit_stochastic) over a fastbp Trainer: after each epoch, the loss in
    scikit-learn's units, the verbose line, the no-improvement count (training loss or validation score), the
    learning-rate rules, the stop decision and the ConvergenceWarning. Used as a Trainer.fit callback
    (shuffled mini-batches) or from a Python loop over in-order mini-batches."""

    def __init__(self, est: _BaseMLP, trainer: Trainer, alpha: float, n: int, batch: int, incremental: bool,
                 X_val, y_val, w_train=None, w_val=None):
        self.est, self.trainer, self.alpha, self.n, self.batch = est, trainer, alpha, n, batch
        self.incremental = incremental
        self.X_val, self.y_val = X_val, y_val
        # Sample weights (None: all equal) of the training rows, in the model's dtype, and of the validation rows.
        self.w_train = None if w_train is None else np.ascontiguousarray(w_train, dtype=est.model_.dtype)
        self.w_val = w_val
        self.r, _ = est._ratios()
        self.n_batches = -(-n // batch)
        self.squares = self._weight_squares()
        est.n_iter_ = 0
        self.bar = None
        if est.verbose is not True and est.verbose >= 2:
            self.bar = ProgressBar(1 if incremental else est.max_iter, n_samples=n, mode="lines", every=1)

    def _weight_squares(self) -> float:
        return sum_of_squares(self.est.model_.weights)  # never np.dot: see fastbp._blas_free

    # -- the epochs ---------------------------------------------------------------------------------------------
    def run(self, X, Y, epochs: int, shuffle: bool) -> None:
        """``epochs`` epochs of Trainer.fit (shuffled mini-batches, or in row order), scikit-learn's end of an
        epoch after each (a callback). A diverging fit with early stopping goes on as scikit-learn's does (see
        _run_diverged_epochs); without early stopping the NonFiniteLossError reaches _fit_stochastic."""
        offset = self.est._loss_offset(Y, self.w_train)  # history.loss: the weighted mean over the epoch's rows

        def callback(trainer, history) -> bool:
            # scikit-learn adds 0.5 alpha ||W_b||^2 / n for each batch b, W_b the weights the batch starts from;
            # with ||W||^2 linear over the epoch, from s0 at its start to s1 at its end, those B terms sum to
            # s0 (B + 1) / 2 + s1 (B - 1) / 2 (exact for one batch).
            squares, batches = self._weight_squares(), self.n_batches
            penalty = 0.5 * self.alpha * (self.squares * (batches + 1) + squares * (batches - 1)) / 2 / self.n
            self.squares = squares
            return self.end_epoch(history.loss[-1], penalty + offset, history)

        try:
            self.trainer.fit(X, Y, epochs=epochs, callbacks=[callback], sample_weight=self.w_train, shuffle=shuffle)
        except NonFiniteLossError:
            if self.X_val is None:
                raise
            self._run_diverged_epochs(epochs)

    def _run_diverged_epochs(self, epochs: int) -> None:
        """scikit-learn's epochs after its weights went non-finite, without training them. scikit-learn keeps
        going on NaN weights: every later epoch's loss is NaN, its validation score is that of NaN weights
        (NaN for a regressor, the share of the first class for a classifier, whose argmax of NaNs is 0), a NaN
        score resets the no-improvement count (a comparison with NaN is False), so the fit runs to max_iter,
        warns, and puts back the best weights it saw (scikit-learn's issue 29504: no error). The trainer
        stopped at the epoch whose loss went non-finite, with the weights before it; the score of NaN weights
        is computed once, and the end of each remaining epoch is scikit-learn's, with that score."""
        est, model = self.est, self.est.model_
        finite = model.flat_parameters()
        model.set_flat_parameters(np.full(model.n_params, np.nan))
        try:
            score = est._validation_score(self.trainer, self.X_val, self.y_val, self.w_val)
        finally:
            model.set_flat_parameters(finite)
        history = History()
        while est.n_iter_ < epochs:
            history.epoch.append(len(history.epoch))
            history.loss.append(np.nan)
            history.lr.append(est._lr_)
            history.time.append(0.0)
            # Best weights NaN (a classifier's NaN score above every earlier one): scikit-learn's
            # "non-finite parameter weights" error, raised by _fit once they are put back.
            if self.end_epoch(np.nan, 0.0, history, validation_score=score, weights=lambda: np.full(
                    model.n_params, np.nan, dtype=model.dtype)):
                break

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    # -- scikit-learn's end of an epoch -------------------------------------------------------------------------
    def end_epoch(self, data_loss: float, penalty: float, history, validation_score=None, weights=None) -> bool:
        """penalty: what scikit-learn's loss adds to ratio * data_loss (its L2 term, and _loss_offset).
        validation_score: the epoch's score when already known; weights: what gives the flat parameters that
        a new best score keeps (default: the model's)."""
        est = self.est
        if self.bar is not None:
            self.bar(self.trainer, history)
        est.n_iter_ += 1
        est.loss_ = np.float64(self.r * data_loss + penalty)  # scikit-learn's type
        est.t_ += self.n
        est.loss_curve_.append(est.loss_)
        if est.verbose:
            print(f"Iteration {est.n_iter_:d}, loss = {est.loss_:.8f}")
        self._update_no_improvement_count(validation_score, weights)
        if est.solver == "sgd" and est.learning_rate == "invscaling":
            self.set_lr(float(est.learning_rate_init) / (est.t_ + 1) ** est.power_t)
        if est._no_improvement_count > est.n_iter_no_change:
            if self.X_val is not None:
                msg = (f"Validation score did not improve more than tol={est.tol:f} for "
                       f"{est.n_iter_no_change:d} consecutive epochs.")
            else:
                msg = (f"Training loss did not improve more than tol={est.tol:f} for "
                       f"{est.n_iter_no_change:d} consecutive epochs.")
            if self._trigger_stopping(msg):
                return True
            est._no_improvement_count = 0
        if self.incremental:
            return True
        if est.n_iter_ == est.max_iter:
            warnings.warn(f"Stochastic Optimizer: Maximum iterations ({est.max_iter:d}) reached and the optimization "
                          "hasn't converged yet.", ConvergenceWarning, stacklevel=2)
        return False

    def _update_no_improvement_count(self, score=None, weights=None) -> None:
        est = self.est
        if self.X_val is not None:
            if score is None:
                score = est._validation_score(self.trainer, self.X_val, self.y_val, self.w_val)
            est.validation_scores_.append(score)
            if est.verbose:
                print(f"Validation score: {est.validation_scores_[-1]:f}")
            if score < est.best_validation_score_ + est.tol:
                est._no_improvement_count += 1
            else:
                est._no_improvement_count = 0
            if score > est.best_validation_score_:
                est.best_validation_score_ = score
                est._best_parameters = est.model_.flat_parameters() if weights is None else weights()
        else:
            if est.loss_curve_[-1] > est.best_loss_ - est.tol:
                est._no_improvement_count += 1
            else:
                est._no_improvement_count = 0
            if est.loss_curve_[-1] < est.best_loss_:
                est.best_loss_ = est.loss_curve_[-1]

    def _trigger_stopping(self, msg: str) -> bool:
        est = self.est
        if est.solver != "sgd" or est.learning_rate != "adaptive":
            if est.verbose:
                print(msg + " Stopping.")
            return True
        if est._lr_ <= 1e-6:
            if est.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        self.set_lr(est._lr_ / 5.0)
        if est.verbose:
            print(f"{msg} Setting learning rate to {est._lr_:f}")
        return False

    def set_lr(self, lr: float) -> None:
        """The optimizer's rate becomes lr (scikit-learn's units) from the next step on. Under momentum, torch's
        buffer is rescaled by old / new so that the next steps are scikit-learn's (its velocity holds steps of
        the old rate)."""
        est, trainer = self.est, self.trainer
        old = est._lr_
        if lr == old:
            return
        if trainer.optimizer == "sgd" and trainer.momentum > 0:
            trainer.scale_momentum(old / lr)
        est._lr_ = lr
        trainer.set_lr(lr * est._ratios()[1])


def _check_optimize_result(result, max_iter: int) -> int:
    """scikit-learn's check of an L-BFGS result: the iteration count, and its ConvergenceWarning text."""
    n_iter = min(result.nit, max_iter)
    if result.status != 0:
        message = f"lbfgs failed to converge after {n_iter} iteration(s) (status={result.status}):\n{result.message}\n"
        if n_iter == max_iter:
            message += f"\nIncrease the number of iterations to improve the convergence (max_iter={max_iter})."
        message += ("\nYou might also want to scale the data as shown in:\n"
                    "    https://scikit-learn.org/stable/modules/preprocessing.html")
        warnings.warn(message, ConvergenceWarning, stacklevel=4)
    return n_iter


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier trained by fastbp: scikit-learn's ``MLPClassifier``, compiled.

    Parameters are scikit-learn 1.9's (same names, order, defaults and meanings; see
    ``sklearn.neural_network.MLPClassifier``), plus:

    device : {"cpu", "cuda", "auto"}, default "cpu"
    dtype : {None, "float32", "float64"}, default None
        None: float32 input trains in float32 and anything else in float64 (lbfgs: float64), as scikit-learn.

    Binary targets get one logistic output, multiclass targets a softmax, a multilabel indicator matrix one
    logistic output per label. Attributes as scikit-learn's (``classes_``, ``loss_``, ``best_loss_``,
    ``loss_curve_``, ``validation_scores_``, ``best_validation_score_``, ``t_``, ``coefs_``, ``intercepts_``,
    ``n_features_in_``, ``feature_names_in_``, ``n_iter_``, ``n_layers_``, ``n_outputs_``, ``out_activation_``).
    See the module docstring for what differs.

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

    loss = "log_loss"  # scikit-learn's (not a constructor parameter of the classifier)

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5, max_iter=200,
                 shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-8, n_iter_no_change=10, max_fun=15000, device="cpu", dtype=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
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
        self.max_fun = max_fun
        self.device = device
        self.dtype = dtype

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same classes as in the previous "
                                     f"call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")
        y = _binarize(self._label_binarizer, y)
        return X, y

    def _out_activation(self) -> str:
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _validation_targets(self, y_val):
        return self._label_binarizer.inverse_transform(y_val)

    def _labels(self, out: np.ndarray):
        if self.n_outputs_ == 1:
            out = out.ravel()
        return self._label_binarizer.inverse_transform(out)

    def _score_validation(self, pred, y_val, sample_weight=None) -> float:
        return float(accuracy_score(y_val, self._labels(pred), sample_weight=sample_weight))

    @available_if(lambda est: est._check_solver())
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """Update the model with a single epoch over X, y.

        ``classes`` (all labels across calls) is required on the first call; y need not contain all of them.
        """
        self._validate_params()
        if _check_partial_fit_first_call(self, classes):
            self._label_binarizer = LabelBinarizer()
            if type_of_target(y).startswith("multilabel"):
                self._label_binarizer.fit(y)
            else:
                self._label_binarizer.fit(classes)
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def predict(self, X):
        """The predicted classes, (n_samples,), or an indicator matrix (n_samples, n_classes) for multilabel."""
        check_is_fitted(self)
        return self._labels(self._forward(X))

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes), columns in the order of ``classes_``."""
        check_is_fitted(self)
        out = self._forward(X)
        if self.n_outputs_ == 1:
            out = out.ravel()
        if out.ndim == 1:
            return np.vstack([1 - out, out]).T
        return out

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        proba = self.predict_proba(X)
        with np.errstate(divide="ignore"):
            return np.log(proba, out=proba)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


def _binarize(binarizer: LabelBinarizer, y) -> np.ndarray:
    """``binarizer.transform(y).astype(bool)`` for labels of the fitted classes (the callers checked them):
    one column for two classes (the second one), one per class beyond, all False for a single class,
    multilabel indicator rows as given. Formed directly for 1-D labels: scikit-learn's transform goes
    through type_of_target and a sparse matrix, 2.4 ms of a 1797-row digits fit's 8 ms of fixed cost."""
    classes = binarizer.classes_
    if y.ndim != 1 or binarizer.y_type_.startswith("multilabel"):
        return binarizer.transform(y).astype(bool)
    if len(classes) == 1:
        return np.zeros((len(y), 1), dtype=bool)
    if len(classes) == 2:
        return (y == classes[1]).reshape(-1, 1)
    return y[:, None] == classes[None, :]


def _check_partial_fit_first_call(clf, classes=None) -> bool:
    """scikit-learn's check (a private helper there): True on the first partial_fit call (classes_ set)."""
    if getattr(clf, "classes_", None) is None and classes is None:
        raise ValueError("classes must be passed on the first call to partial_fit.")
    if classes is not None:
        if getattr(clf, "classes_", None) is not None:
            if not np.array_equal(clf.classes_, unique_labels(classes)):
                raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: "
                                 f"{clf.classes_!r}")
        else:
            clf.classes_ = unique_labels(classes)
            return True
    return False


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor trained by fastbp: scikit-learn's ``MLPRegressor``, compiled.

    Parameters are scikit-learn 1.9's, in its order (``loss`` first: ``"squared_error"`` or ``"poisson"``, the
    half Poisson deviance with an exp output), plus ``device`` and ``dtype`` as in :class:`MLPClassifier`. ``y``
    is (n_samples,) or (n_samples, n_outputs); ``predict`` returns (n_samples,) for one output. ``loss_curve_``
    holds scikit-learn's loss (half squared error or half deviance, plus its penalty term);
    ``validation_scores_`` holds R^2.

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

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1, beta_1=0.9,
                 beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000, device="cpu", dtype=None):
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
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
        self.max_fun = max_fun
        self.device = device
        self.dtype = dtype

    def _validate_input(self, X, y, incremental, reset):
        X, y = validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and y.size and y.min() < 0:  # before anything is fitted
            raise ValueError(f"loss='poisson' needs targets y >= 0 (counts or rates); got values down to {y.min()}")
        return X, y

    def _out_activation(self) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _score_validation(self, pred, y_val, sample_weight=None) -> float:
        if not np.isfinite(pred).all():
            return np.nan
        return float(r2_score(y_val, pred.ravel() if pred.shape[1] == 1 else pred, sample_weight=sample_weight))

    @available_if(lambda est: est._check_solver)  # scikit-learn's: always available (lbfgs then refits)
    def partial_fit(self, X, y, sample_weight=None):
        """Update the model with a single epoch over X, y (with lbfgs, as in scikit-learn: an lbfgs run from
        the current weights)."""
        self._validate_params()
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def predict(self, X):
        """Predictions (n_samples,) for one output, (n_samples, n_outputs) otherwise."""
        check_is_fitted(self)
        out = self._forward(X)
        return out.ravel() if out.shape[1] == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
