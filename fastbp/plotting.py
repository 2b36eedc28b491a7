"""Plots of training runs (needs the optional extra ``plot``, i.e. matplotlib:
``pip install -e '.[plot]'`` in a clone).

Every function draws into ``ax`` (a new figure's Axes when None) and returns the Axes, so plots combine
into the user's own figures. Nothing here picks a matplotlib backend: scripts that only save files
should call ``matplotlib.use("Agg")`` first (the examples do).

>>> import matplotlib; matplotlib.use("Agg")
>>> from fastbp.plotting import plot_history
>>> ax = plot_history({"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6]})
>>> [line.get_label() for line in ax.get_lines()]
['train loss', 'validation loss']
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.figure(figsize=(6, 4)).add_subplot()


def _curves(history) -> tuple[list, list, list]:
    """(train loss, validation loss, validation accuracy/score) lists from a History, a dict, or a fitted
    fastbp.sklearn estimator (``loss_curve_`` / ``validation_scores_``)."""
    if hasattr(history, "loss_curve_"):
        return list(history.loss_curve_), [], list(getattr(history, "validation_scores_", None) or [])
    if isinstance(history, Mapping) or hasattr(history, "__getitem__"):
        def get(key):
            try:
                return list(history[key] or [])
            except (KeyError, AttributeError):
                return []

        return get("loss"), get("val_loss"), get("val_accuracy")
    raise TypeError(f"expected a fastbp History, a dict with 'loss', or a fitted estimator; got "
                    f"{type(history).__name__}")


def plot_history(history: Any, ax=None, *, log_scale: bool = True, title: str | None = "Loss per epoch"):
    """Training (and validation) loss per epoch.

    Parameters
    ----------
    history : fastbp.History, dict with ``"loss"`` (and optionally ``"val_loss"``, ``"val_accuracy"``), or
        a fitted :mod:`fastbp.sklearn` estimator (``loss_curve_``, ``validation_scores_``).
    ax : matplotlib Axes or None
    log_scale : bool
        Logarithmic loss axis (when all losses are positive).
    title : str or None

    Returns
    -------
    matplotlib.axes.Axes
        Lines labelled ``"train loss"``, ``"validation loss"``; validation accuracy (or score), when
        present, is drawn on a twin axis on the right.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np, fastbp
    >>> from fastbp.plotting import plot_history
    >>> X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(-1, 1)
    >>> trainer = fastbp.Trainer(fastbp.MLP([1, 8, 1], "tanh", seed=0), loss="mse", lr=0.1, batch_size=None)
    >>> ax = plot_history(trainer.fit(X, 2 * X, epochs=20, validation_data=(X, 2 * X)))
    >>> ax.get_xlabel()
    'epoch'
    """
    loss, val_loss, val_score = _curves(history)
    ax = _axes(ax)
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, label="train loss", color="C0")
    if val_loss:
        ax.plot(np.arange(1, len(val_loss) + 1), val_loss, label="validation loss", color="C1")
    values = np.asarray(loss + val_loss, dtype=float)
    if log_scale and values.size and np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    if val_score:
        twin = ax.twinx()
        (line,) = twin.plot(np.arange(1, len(val_score) + 1), val_score, color="C2", linestyle="--",
                            label="validation accuracy" if not hasattr(history, "loss_curve_")
                            else "validation score")
        twin.set_ylabel(line.get_label())
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, loc="center right" if val_score else "best")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def plot_fit_1d(predict: Callable[[np.ndarray], np.ndarray], X, y, ax=None, *, grid: np.ndarray | None = None,
                reference: Callable[[np.ndarray], np.ndarray] | None = None, title: str | None = None):
    """A one-input, one-output model's curve over its training data.

    Parameters
    ----------
    predict : callable ``(m, 1) array -> (m, 1) or (m,) array`` (``trainer.predict``, ``estimator.predict``)
    X : array (n, 1) or (n,); y : array (n, 1) or (n,)
        The training data, drawn as points.
    grid : array (m,) or None
        Inputs at which to draw the curve (default: 200 points spanning X, 10% beyond each side).
    reference : callable ``(m,) -> (m,)`` or None
        A true function to draw for comparison (dashed).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import numpy as np
    >>> from fastbp.plotting import plot_fit_1d
    >>> X = np.linspace(-1, 1, 20); ax = plot_fit_1d(lambda g: 2 * g, X, 2 * X, reference=lambda g: 2 * g)
    >>> len(ax.get_lines())
    3
    """
    X = np.asarray(X, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    ax = _axes(ax)
    if grid is None:
        span = X.max() - X.min() if X.size else 1.0
        grid = np.linspace(X.min() - 0.1 * span, X.max() + 0.1 * span, 200)
    grid = np.asarray(grid, dtype=float).ravel()
    ax.plot(X, y, "o", markersize=3, alpha=0.5, label="data", color="C0")
    ax.plot(grid, np.asarray(predict(grid.reshape(-1, 1))).ravel(), label="model", color="C3", linewidth=2)
    if reference is not None:
        ax.plot(grid, np.asarray(reference(grid)).ravel(), "--", label="truth", color="k", alpha=0.7)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    return ax


def plot_confusion_matrix(y_true, y_pred, ax=None, *, labels: Sequence | None = None, normalize: bool = False,
                          title: str | None = "Confusion matrix"):
    """Counts (or row fractions with ``normalize``) of true class (rows) against predicted class (columns).

    Parameters
    ----------
    y_true, y_pred : arrays (n,) of labels
    labels : sequence or None
        Class order (default: the sorted union of both).
    normalize : bool
        Divide each row by its total (the recall of each class on the diagonal).

    Returns
    -------
    matplotlib.axes.Axes, with the matrix as an image and each cell's value written in it.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> from fastbp.plotting import plot_confusion_matrix
    >>> ax = plot_confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2])
    >>> ax.images[0].get_array().shape
    (3, 3)
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else np.asarray(labels)
    index = {label: i for i, label in enumerate(labels.tolist())}
    matrix = np.zeros((len(labels), len(labels)))
    for t, p in zip(y_true.tolist(), y_pred.tolist()):
        matrix[index[t], index[p]] += 1
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax = _axes(ax)
    image = ax.imshow(matrix, cmap="Blues")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(len(labels)):
        for j in range(len(labels)):
            text = f"{matrix[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    ax.set_xticks(range(len(labels)), [str(label) for label in labels])
    ax.set_yticks(range(len(labels)), [str(label) for label in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return ax


def plot_timings(batch_sizes: Sequence[int], seconds: Mapping[str, Sequence[float]], ax=None, *,
                 ylabel: str = "seconds per epoch", title: str | None = "Training time by batch size"):
    """Time per epoch (or any time) against batch size, one line per device: shows where the GPU overtakes.

    Parameters
    ----------
    batch_sizes : sequence of int (the x axis, log scale)
    seconds : mapping ``device name -> sequence of float`` (same length as ``batch_sizes``; NaN = not run)

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> from fastbp.plotting import plot_timings
    >>> ax = plot_timings([16, 64, 256], {"cpu": [0.3, 0.1, 0.05]})
    >>> ax.get_xscale()
    'log'
    """
    ax = _axes(ax)
    for i, (device, values) in enumerate(seconds.items()):
        ax.plot(list(batch_sizes), list(values), "o-", label=device, color=f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title)
    return ax
