"""One table of losses: for each loss, everything the host side needs to know about it.

The compiled math (the fused loss-gradient and the output transform) lives in ``fastbp.kernels.pointwise``
under the integer code given here; this table holds the rest, in one place for the Trainer, the
scikit-learn estimators and the distributed trainer:

- ``output``: the transform ``predict`` applies (identity, sigmoid, softmax or exp);
- ``divisor(n_rows, n_outputs)``: how many terms the loss is a mean over (PyTorch's ``reduction="mean"``);
- ``targets(...)``: the check and conversion of user targets into the kernels' (n, k) float matrix, with the
  error messages; ``device_bounds``: the value range a GPU target array is checked against;
- ``metrics``: the scores ``evaluate`` reports, and ``n_correct(predictions, Y)`` for the accuracy.

Definitions (as PyTorch's ``MSELoss``, ``BCEWithLogitsLoss``, ``CrossEntropyLoss`` and
``PoissonNLLLoss(log_input=True)``, reduction "mean"): mse averages ``(out - y)**2`` over every element;
binary_cross_entropy averages ``-[y log q + (1-y) log(1-q)]``, ``q = sigmoid(z)``, over every element;
softmax_cross_entropy averages ``-sum_j y_j log softmax(z)_j`` over samples (``y`` class ids or one-hot /
class-probability rows); poisson averages ``exp(z) - y z`` over every element (the negative log-likelihood of
counts ``y >= 0`` at the rate ``exp(z)``, less the ``log(y!)`` term, which does not depend on the network).

>>> from fastbp.losses import LOSSES
>>> spec = LOSSES["softmax_cross_entropy"]
>>> spec.output, spec.metrics, spec.divisor(32, 10)
('softmax', ('loss', 'accuracy'), 32)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import as_float_matrix, check_choice
from .kernels import pointwise


@dataclass(frozen=True)
class Loss:
    """How one loss behaves on the host (see the module docstring)."""

    name: str
    code: int  # the kernels' code: pointwise.MSE, BINARY_CROSS_ENTROPY, SOFTMAX_CROSS_ENTROPY or POISSON
    output: str  # the output transform: "identity", "sigmoid", "softmax" or "exp"
    device_bounds: tuple | None  # (low, high) that every target value must lie in, or None

    @property
    def metrics(self) -> tuple:
        """The scores :meth:`fastbp.Trainer.evaluate` reports for this loss."""
        return ("loss", "accuracy") if self.is_classification else ("loss",)

    @property
    def is_classification(self) -> bool:
        return self.output in ("sigmoid", "softmax")

    def divisor(self, n_rows: int, n_outputs: int) -> int:
        """How many terms the loss over n_rows rows of n_outputs outputs is a mean over (the kernels' own rule,
        pointwise.loss_divisor, run as Python)."""
        return int(pointwise.loss_divisor.py_func(self.code, int(n_rows), int(n_outputs)))

    def n_correct(self, predictions: np.ndarray, Y: np.ndarray) -> int:
        """How many of the accuracy's terms are right: rows whose argmax matches (softmax), or elements on
        the right side of 0.5 (sigmoid). predictions, Y (n, k) host arrays."""
        if self.output == "softmax":
            return int(np.count_nonzero(predictions.argmax(axis=1) == Y.argmax(axis=1)))
        return int(np.count_nonzero((predictions > 0.5) == (Y > 0.5)))

    def row_accuracy(self, predictions: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """(n,) float64: each row's share of right accuracy terms (1 or 0 for softmax, the fraction of its
        outputs on the right side of 0.5 for sigmoid), for accuracies weighted per row (sample weights)."""
        if self.output == "softmax":
            return (predictions.argmax(axis=1) == Y.argmax(axis=1)).astype(np.float64)
        return ((predictions > 0.5) == (Y > 0.5)).mean(axis=1, dtype=np.float64)

    def accuracy_terms(self, n_rows: int, n_outputs: int) -> int:
        """How many terms :meth:`n_correct` counts over: rows (softmax) or elements (sigmoid)."""
        return n_rows if self.output == "softmax" else n_rows * n_outputs

    def targets(self, y, n_samples: int, n_outputs: int, dtype, name: str = "y") -> np.ndarray:
        """Host targets checked and converted to the kernels' (n, k) matrix of ``dtype`` (class ids become
        one-hot rows); a ValueError or TypeError names ``name``, what was expected and what came."""
        k = n_outputs
        if self.output == "softmax":
            try:
                arr = np.asarray(y)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{name} must be an array of class ids; numpy cannot convert it ({error})") from None
            if arr.ndim == 1:
                return self._class_ids(arr, n_samples, k, dtype, name)
        meaning = (f"one-hot or class-probability rows for {k} classes; class ids go in a 1-D array"
                   if self.output == "softmax" else "the network's output size")
        Y = as_float_matrix(name, y, dtype, n_columns=k, allow_vector=True, columns_meaning=meaning)
        if Y.shape[0] != n_samples:
            raise ValueError(f"{name} has {Y.shape[0]} samples but X has {n_samples}")
        if self.output == "sigmoid" and ((Y < 0) | (Y > 1)).any():
            raise ValueError(f"{name} must lie in [0, 1] for {self.name}; got values from {Y.min()} to {Y.max()}")
        if self.output == "exp" and (Y < 0).any():
            raise ValueError(f"{name} must be >= 0 (counts or rates) for {self.name}; got values down to {Y.min()}")
        if self.output == "softmax" and (Y < 0).any():
            raise ValueError(f"{name} rows must be class probabilities (>= 0) for {self.name}; "
                             f"got values down to {Y.min()}")
        return Y

    @staticmethod
    def _class_ids(arr: np.ndarray, n_samples: int, k: int, dtype, name: str) -> np.ndarray:
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold integer class ids in [0, {k}); got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{name} must hold integer class ids in [0, {k}); got NaN or inf")
        if arr.dtype.kind == "f" and not (arr == np.round(arr)).all():
            bad = arr[arr != np.round(arr)][0]
            raise ValueError(f"{name} must hold integer class ids in [0, {k}); got non-integer values such as {bad}")
        if arr.shape[0] != n_samples:
            raise ValueError(f"{name} has {arr.shape[0]} samples but X has {n_samples}")
        if arr.size and (arr.min() < 0 or arr.max() >= k):
            raise ValueError(f"{name} must hold class ids in [0, {k}) (the output size); "
                             f"got values from {arr.min()} to {arr.max()}")
        Y = np.zeros((n_samples, k), dtype=dtype)
        Y[np.arange(n_samples), arr.astype(np.int64, copy=False)] = 1
        return Y

    def check_device_targets(self, shape: tuple, n_outputs: int, name: str = "y") -> None:
        """The host-side part of checking a GPU target array: class ids cannot be one-hot encoded there."""
        if self.output == "softmax" and len(shape) == 1 and n_outputs > 1:
            raise TypeError(f"{name} is a GPU vector of class ids; on the GPU pass one-hot or class-probability "
                            f"rows ({shape[0]}, {n_outputs}) of the model's dtype")


LOSSES = {
    "mse": Loss("mse", pointwise.MSE, "identity", device_bounds=None),
    "binary_cross_entropy": Loss("binary_cross_entropy", pointwise.BINARY_CROSS_ENTROPY, "sigmoid",
                                 device_bounds=(0.0, 1.0)),
    "softmax_cross_entropy": Loss("softmax_cross_entropy", pointwise.SOFTMAX_CROSS_ENTROPY, "softmax",
                                  device_bounds=(0.0, np.inf)),
    "poisson": Loss("poisson", pointwise.POISSON, "exp", device_bounds=(0.0, np.inf)),
}


# Names users of other libraries write, with what fastbp calls them (check_choice shows these hints): a close
# spelling is not the answer here ("cross_entropy" is spelled like 'binary_cross_entropy', but a PyTorch user
# means nn.CrossEntropyLoss, which is 'softmax_cross_entropy').
_CROSS_ENTROPY_HINT = (
    "For class labels (PyTorch's nn.CrossEntropyLoss) use 'softmax_cross_entropy': one output per class, y holds "
    "class ids (n,) or one-hot / probability rows (n, k). For independent yes/no targets (nn.BCEWithLogitsLoss) "
    "use 'binary_cross_entropy': y in [0, 1], one column per target.")
LOSS_HINTS = {name: _CROSS_ENTROPY_HINT for name in (
    "cross_entropy", "crossentropy", "crossentropyloss", "ce", "categorical_crossentropy",
    "categorical_cross_entropy", "sparse_categorical_crossentropy", "log_loss", "nll", "nll_loss")}
LOSS_HINTS |= {name: "Did you mean 'binary_cross_entropy'?" for name in ("bce", "binary_crossentropy",
                                                                        "bcewithlogitsloss")}
LOSS_HINTS |= {name: "Did you mean 'mse'?" for name in ("mean_squared_error", "squared_error", "l2", "mseloss")}
LOSS_HINTS |= {name: "Did you mean 'poisson'?" for name in ("poisson_nll", "poissonnllloss", "poisson_nll_loss")}


def get_loss(name) -> Loss:
    """The table entry for ``name``; a clear error (with a suggestion on a typo) otherwise."""
    return LOSSES[check_choice("loss", name, LOSSES, hints=LOSS_HINTS)]
