"""The Trainer: a thin loop over epochs that dispatches to one target's backend, chosen once."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import backends
from ._interrupt import deferred_keyboard_interrupt
from ._validation import as_float_matrix, check_bool, check_choice, check_float, check_int, is_gpu_array
from .kernels.pointwise import (
    BINARY_CROSS_ENTROPY,
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    LOSSES,
    MSE,
    N_HYPER,
    OPTIMIZERS,
    SOFTMAX_CROSS_ENTROPY,
)
from .model import MLP
from .schedules import Constant

# Bound on the int64 sample orders generated for one compiled multi-epoch call (8 bytes each).
MAX_ORDER_ENTRIES = 1 << 22
# Target length of one compiled multi-epoch call: a compiled call cannot be interrupted, so this bounds how
# long Ctrl-C waits (the interrupt is delivered after the call, once its epochs are recorded).
CHUNK_SECONDS = 0.25


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the model holds the last epoch whose loss was finite."""


@dataclass
class History:
    """What fit recorded, one entry per completed epoch (a dict-like view: ``history["loss"]``)."""

    epoch: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    time: list = field(default_factory=list)
    stop_reason: str = "epochs"

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return ["epoch", "loss", "val_loss", "val_accuracy", "lr", "time"]

    def as_dict(self) -> dict:
        return {key: list(self[key]) for key in self.keys()} | {"stop_reason": self.stop_reason}


@dataclass
class LearningRateSearch:
    """Result of :meth:`Trainer.choose_learning_rate`: the best rate and one row per candidate."""

    best_lr: float
    table: list  # dicts: lr, train_loss, val_loss (and val_accuracy for classification)

    def __str__(self) -> str:
        lines = [f"{'lr':>10} {'train_loss':>12} {'val_loss':>12}"]
        for row in self.table:
            mark = "  <- best" if row["lr"] == self.best_lr else ""
            lines.append(f"{row['lr']:>10.4g} {row['train_loss']:>12.5g} {row['val_loss']:>12.5g}{mark}")
        return "\n".join(lines)


class _EarlyStopping:
    """Early stopping on the validation loss: keeps a snapshot of the best epoch's state and counts the
    epochs since; shared by Trainer.fit and DataParallelTrainer.fit."""

    def __init__(self, trainer: "Trainer", patience: int):
        self.trainer = trainer
        self.patience = patience
        self.best_loss = np.inf
        self.best_state = None  # (flat params, optimizer state, steps done), host copies
        self.since_best = 0

    def should_stop(self, val_loss: float, params) -> bool:
        """Record this epoch's validation loss; True once ``patience`` epochs passed without a new best."""
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = self.trainer._backend_snapshot(params)
            self.since_best = 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def restore(self) -> None:
        """Put the best epoch's parameters, optimizer state and step count back into the trainer."""
        if self.best_state is not None:
            params, opt_state, steps = self.best_state
            self.trainer.model.set_flat_parameters(params)
            self.trainer.opt_state[...] = opt_state
            self.trainer.steps_done = steps


class Trainer:
    """Trains an :class:`MLP` with a fused loss, an optimizer and a learning-rate schedule.

    Parameters
    ----------
    model : MLP
        The network; its ``weights`` / ``biases`` are read at the start of every call and hold the result.
    loss : {"mse", "binary_cross_entropy", "softmax_cross_entropy"}
        Defined as PyTorch's ``MSELoss``, ``BCEWithLogitsLoss`` and ``CrossEntropyLoss`` with
        ``reduction="mean"``. mse: mean over all elements of ``(out - y)**2``, identity output.
        binary_cross_entropy: mean over all elements of ``-[y log q + (1-y) log(1-q)]``, ``q = sigmoid(z)``.
        softmax_cross_entropy: mean over samples of ``-log softmax(z)[label]``; ``y`` holds integer class
        ids ``(n,)`` or one-hot / class-probability rows ``(n, k)``.
    optimizer : {"sgd", "adam"}
        Exactly ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)`` and
        ``torch.optim.Adam(lr, betas, eps, weight_decay)`` (weight decay as L2 added to the gradient).
    lr : float or callable ``epoch -> lr``
        A constant rate, a schedule from :mod:`fastbp.schedules` (``ExponentialDecay``, ``StepDecay``) or
        any callable of the epoch number (0-based, counted across fits).
    batch_size : int or None
        Mini-batch size; ``None`` is full-batch gradient descent. The last partial batch is used.
    device : {"cpu", "cuda", "auto"}
    seed : int or None
        Seeds the per-epoch shuffling (the same on every device).

    Examples
    --------
    >>> import numpy as np, fastbp
    >>> X = np.linspace(-1, 1, 100, dtype=np.float32).reshape(-1, 1); y = 2 * X
    >>> trainer = fastbp.Trainer(fastbp.MLP([1, 16, 1], "sigmoid", seed=0), loss="mse", lr=0.5,
    ...                          batch_size=None, seed=0)
    >>> history = trainer.fit(X, y, epochs=200)
    >>> history["loss"][-1] < history["loss"][0]
    True
    """

    def __init__(self, model: MLP, loss: str = "mse", optimizer: str = "sgd", lr=0.01, *, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, batch_size: int | None = 32,
                 device: str = "cpu", seed: int | None = None):
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastbp.MLP; got {type(model).__name__}")
        self.model = model
        self.loss = check_choice("loss", loss, LOSSES)
        self.optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.lr = lr
        self._schedule = self._check_lr(lr)
        momentum = check_float("momentum", momentum, minimum=0.0)
        dampening = check_float("dampening", dampening, minimum=0.0, maximum=1.0)
        weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
        check_bool("nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0 (as in torch.optim.SGD); "
                             f"got momentum={momentum}, dampening={dampening}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        beta1 = check_float("betas[0]", betas[0], minimum=0.0, maximum=1.0, exclusive_maximum=True)
        beta2 = check_float("betas[1]", betas[1], minimum=0.0, maximum=1.0, exclusive_maximum=True)
        eps = check_float("eps", eps, minimum=0.0, exclusive_minimum=True)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
        self.device = backends.resolve_device(check_choice("device", device, backends.DEVICES))
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        self.momentum, self.dampening, self.nesterov, self.weight_decay = momentum, dampening, bool(nesterov), weight_decay
        self.betas, self.eps = (beta1, beta2), eps

        hyper = np.zeros(N_HYPER)
        hyper[H_MOMENTUM], hyper[H_DAMPENING], hyper[H_WEIGHT_DECAY] = momentum, dampening, weight_decay
        hyper[H_NESTEROV], hyper[H_BETA1], hyper[H_BETA2], hyper[H_EPS] = float(nesterov), beta1, beta2, eps
        self._rng = np.random.default_rng(seed)
        self._backend = backends.create_backend(
            self.device, layout=model.layout, act_codes=model.activation_codes(), loss=LOSSES[self.loss],
            optimizer=OPTIMIZERS[self.optimizer], hyper=hyper, dtype=model.dtype)
        self.opt_state = np.zeros((2, model.n_params), dtype=model.dtype)
        self.steps_done = 0  # optimizer steps taken (torch's state["step"])
        self.epochs_done = 0  # epochs completed across fits: the schedule's clock
        self.history = History()  # every epoch of every fit

    # -- arguments ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_lr(lr):
        if callable(lr):
            return lr
        return Constant(check_float("lr", lr, minimum=0.0, exclusive_minimum=True))

    def _lr_at(self, epoch: int) -> float:
        lr = self._schedule(epoch)
        try:
            return check_float(f"lr schedule at epoch {epoch}", lr, minimum=0.0, exclusive_minimum=True)
        except TypeError as error:
            raise TypeError(f"the lr schedule must return a number; at epoch {epoch} it returned {lr!r}") from error

    @property
    def n_outputs(self) -> int:
        return self.model.sizes[-1]

    def _inputs(self, X, name: str = "X"):
        """X checked: a host array becomes a C-contiguous (n, n_in) matrix of the model's dtype (not yet on the
        device); a GPU array is checked on the device and used in place, without a copy."""
        if is_gpu_array(X):
            return self._backend.as_device_input(name, X, self.model.sizes[0])
        return as_float_matrix(name, X, self.model.dtype, n_columns=self.model.sizes[0])

    def _targets(self, y, n_samples: int, name: str = "y") -> np.ndarray:
        """Targets checked on the host, as a (n, k) float matrix in the kernels' form (one-hot rows for
        class ids)."""
        k = self.n_outputs
        if is_gpu_array(y):
            bounds = {"binary_cross_entropy": (0.0, 1.0), "softmax_cross_entropy": (0.0, np.inf)}.get(self.loss)
            if self.loss == "softmax_cross_entropy" and len(y.shape) == 1 and k > 1:
                raise TypeError(f"{name} is a GPU vector of class ids; on the GPU pass one-hot or class-probability "
                                f"rows ({n_samples}, {k}) of the model's dtype")
            Y = self._backend.as_device_input(name, y, k, allow_vector=True, bounds=bounds)
            if Y.shape[0] != n_samples:
                raise ValueError(f"{name} has {Y.shape[0]} samples but X has {n_samples}")
            return Y
        if self.loss == "softmax_cross_entropy":
            try:
                arr = np.asarray(y)
            except (ValueError, TypeError) as error:
                raise ValueError(f"{name} must be an array of class ids; numpy cannot convert it ({error})") from None
            if arr.ndim == 1:
                if arr.dtype.kind not in "iuf":
                    raise TypeError(f"{name} must hold integer class ids in [0, {k}); got dtype {arr.dtype}")
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    raise ValueError(f"{name} must hold integer class ids in [0, {k}); got NaN or inf")
                if arr.dtype.kind == "f" and not (arr == np.round(arr)).all():
                    bad = arr[arr != np.round(arr)][0]
                    raise ValueError(f"{name} must hold integer class ids in [0, {k}); got non-integer values "
                                     f"such as {bad}")
                if arr.shape[0] != n_samples:
                    raise ValueError(f"{name} has {arr.shape[0]} samples but X has {n_samples}")
                if arr.size and (arr.min() < 0 or arr.max() >= k):
                    raise ValueError(f"{name} must hold class ids in [0, {k}) (the output size); "
                                     f"got values from {arr.min()} to {arr.max()}")
                Y = np.zeros((n_samples, k), dtype=self.model.dtype)
                Y[np.arange(n_samples), arr.astype(np.int64)] = 1
                return Y
        meaning = (f"one-hot or class-probability rows for {k} classes; class ids go in a 1-D array"
                   if self.loss == "softmax_cross_entropy" else "the network's output size")
        Y = as_float_matrix(name, y, self.model.dtype, n_columns=k, allow_vector=True, columns_meaning=meaning)
        if Y.shape[0] != n_samples:
            raise ValueError(f"{name} has {Y.shape[0]} samples but X has {n_samples}")
        if self.loss == "binary_cross_entropy" and ((Y < 0) | (Y > 1)).any():
            raise ValueError(f"{name} must lie in [0, 1] for binary_cross_entropy; got values from "
                             f"{Y.min()} to {Y.max()}")
        if self.loss == "softmax_cross_entropy" and (Y < 0).any():
            raise ValueError(f"{name} rows must be class probabilities (>= 0) for softmax_cross_entropy; "
                             f"got values down to {Y.min()}")
        return Y

    def _check_data(self, X, y, prefix: str = ""):
        """(X, Y) checked on the host; nothing is converted for the device yet."""
        Xh = self._inputs(X, prefix + "X")
        return Xh, self._targets(y, Xh.shape[0], prefix + "y")

    def _data(self, X, y, prefix: str = ""):
        """(X, Y) checked, then in the backend's form."""
        Xh, Yh = self._check_data(X, y, prefix)
        return self._backend.as_input(Xh), self._backend.as_input(Yh)

    def _check_validation_data(self, validation_data):
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            got = (f"a {type(validation_data).__name__} of length {len(validation_data)}"
                   if isinstance(validation_data, (tuple, list)) else type(validation_data).__name__)
            raise TypeError(f"validation_data must be a pair (X_val, y_val); got {got}")
        return self._check_data(*validation_data, prefix="validation_data ")

    # -- state in and out of the backend ------------------------------------------------------------------
    def _begin(self):
        self.model.check_parameters()
        params = self.model.flat_parameters()
        self._backend.load_state(params, self.opt_state.copy(), self.steps_done)
        return params

    def _end(self, params):
        """Bring the backend's parameters and optimizer state home, into the model's own arrays."""
        self.steps_done = self._backend.store_state(params, self.opt_state)
        self.model.set_flat_parameters(params)

    # -- public API ---------------------------------------------------------------------------------------
    def fit(self, X, y, epochs: int = 1, *, validation_data=None, target_loss: float | None = None,
            patience: int | None = None, restore_best: bool = True, callbacks=(), on_nonfinite: str = "raise",
            verbose: bool | int = False):
        """Train for ``epochs`` epochs (or until a stopping rule fires) and return the :class:`History`.

        Parameters
        ----------
        X : array (n, n_in); y : targets (see the ``loss`` parameter of :class:`Trainer`).
        epochs : int >= 0
        validation_data : (X_val, y_val) or None
            Evaluated after every epoch (``val_loss``, and ``val_accuracy`` for classification losses).
        target_loss : float or None
            Stop once an epoch's training loss is <= this value ("train until good enough").
        patience : int or None
            Early stopping: stop after this many epochs without a lower validation loss; with
            ``restore_best`` the weights of the best epoch are put back. Needs ``validation_data``.
        callbacks : sequence of callables ``callback(trainer, history) -> bool | None``
            Called after every epoch; returning True stops training.
        on_nonfinite : {"raise", "warn"}
            If an epoch's loss is NaN or inf, the model is restored to the previous epoch and a
            :class:`NonFiniteLossError` is raised (or a RuntimeWarning issued and fit returns).
        verbose : bool or int
            0 / False (default): silent. True / 1: a :class:`fastbp.progress.ProgressBar` on stderr (a bar
            on a terminal; about 20 plain lines per fit otherwise). 2: a plain line every epoch.

        Per-epoch control (validation, patience, callbacks) runs epochs one compiled call at a time;
        without it, many epochs run inside one call (the history is recorded all the same).
        """
        epochs = check_int("epochs", epochs, minimum=0)
        target = check_float("target_loss", target_loss, allow_none=True)
        patience = check_int("patience", patience, minimum=1, allow_none=True)
        restore_best = check_bool("restore_best", restore_best)
        check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
        if patience is not None and validation_data is None:
            raise ValueError("patience (early stopping) needs validation_data=(X_val, y_val)")
        callbacks = self._check_callbacks(callbacks)
        # Every argument is checked on the host before anything is converted, copied to a device or changed.
        Xh, Yh = self._check_data(X, y)
        validation = None if validation_data is None else self._check_validation_data(validation_data)
        Xc, Yc = self._backend.as_input(Xh), self._backend.as_input(Yh)
        if validation is not None:
            validation = tuple(self._backend.as_input(a) for a in validation)
        progress = None
        if verbose:
            from .progress import ProgressBar

            progress = ProgressBar(epochs, n_samples=Xc.shape[0], mode="lines" if verbose == 2 else "auto",
                                   every=1 if verbose == 2 else None)
            callbacks.append(progress)
        n = Xc.shape[0]
        batch_size = n if self.batch_size is None else min(self.batch_size, n)
        shuffle = batch_size < n  # a full batch's gradient does not depend on the order
        per_epoch_control = validation is not None or bool(callbacks)
        # Epochs per compiled call: one with per-epoch control; otherwise grown from 1 towards CHUNK_SECONDS
        # a call (Ctrl-C waits at most about that long) within the memory bound on the sample orders.
        max_chunk = 1 if per_epoch_control else (max(1, MAX_ORDER_ENTRIES // n) if shuffle else max(1, epochs))
        chunk = 1

        history = History()
        early = _EarlyStopping(self, patience) if patience is not None else None
        params = self._begin()
        try:
            remaining = epochs
            while remaining > 0:
                count = min(chunk, remaining)
                first = self.epochs_done
                # The schedule is asked once per epoch, just before its chunk (it may read state that
                # callbacks change). A bad value stops fit at that epoch: the epochs before it still run,
                # then the error is raised with the model at the end of the last good epoch.
                lrs, schedule_error = self._lrs(first, count)
                if len(lrs) == 0:
                    raise schedule_error
                count = len(lrs)
                # The compiled call and the record of what it did form one step that Ctrl-C cannot split:
                # an interrupt is delivered after it, when parameters, optimizer state, epoch counter,
                # shuffling RNG and history all describe the same last completed epoch.
                with deferred_keyboard_interrupt():
                    rng_state = self._rng.bit_generator.state
                    try:
                        orders = (np.stack([self._rng.permutation(n) for _ in range(count)]) if shuffle
                                  else np.empty((count, 0), dtype=np.int64))
                        started = time.perf_counter()
                        losses, completed = self._backend.train_epochs(
                            Xc, Yc, batch_size, orders, lrs, -np.inf if target is None else target)
                    except BaseException:
                        self._rng.bit_generator.state = rng_state
                        raise
                    elapsed = time.perf_counter() - started
                    per_epoch = elapsed / max(1, len(losses))
                    self._record_many(history, first, losses[:completed], lrs[:completed], per_epoch)
                    self.epochs_done += completed
                    remaining -= completed
                    if completed < count:  # the RNG advances only for epochs that were kept
                        self._rng.bit_generator.state = rng_state
                        for _ in range(completed if shuffle else 0):
                            self._rng.permutation(n)
                    if completed < count and not np.isfinite(losses[-1]):
                        history.stop_reason = "nonfinite"
                        self._nonfinite(first + completed, losses[-1], lrs[completed], on_nonfinite)
                        break
                    if target is not None and completed and losses[completed - 1] <= target:
                        history.stop_reason = "target_loss"
                        break
                    if validation is not None:
                        Xv, Yv = validation
                        val_loss = self._backend.loss_value(Xv, Yv)
                        acc = (self._accuracy(self._backend.predict(Xv, self.n_outputs), Yv)
                               if self.loss != "mse" else None)
                        for h in (history, self.history):
                            h.val_loss.append(val_loss)
                            if acc is not None:
                                h.val_accuracy.append(acc)
                        if early is not None and early.should_stop(val_loss, params):
                            history.stop_reason = "early_stopping"
                            break
                    if callbacks:  # callbacks (and a trainer.save inside one) see the current state
                        self._end(params)
                if schedule_error is not None:
                    raise schedule_error
                if any(bool(cb(self, history)) for cb in callbacks):
                    history.stop_reason = "callback"
                    break
                # Next chunk: about CHUNK_SECONDS at the pace just measured, growing at most 8-fold a call.
                chunk = int(max(1, min(max_chunk, chunk * 8, CHUNK_SECONDS / max(per_epoch, 1e-9))))
        finally:
            with deferred_keyboard_interrupt():  # never a half-copied model
                self._end(params)
            if progress is not None:
                progress.close(history)
        if history.stop_reason == "early_stopping" and restore_best:
            with deferred_keyboard_interrupt():
                early.restore()
        return history

    @staticmethod
    def _check_callbacks(callbacks) -> list:
        if callbacks is None:
            return []
        if callable(callbacks) or isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
            raise TypeError("callbacks must be a list of callables callback(trainer, history); got "
                            f"{type(callbacks).__name__} {callbacks!r} (wrap a single callback in a list)")
        callbacks = list(callbacks)
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise TypeError(f"callbacks[{i}] must be callable; got {type(cb).__name__}")
        return callbacks

    def _backend_snapshot(self, params):
        """Copies of the backend's current params, optimizer state and step count (host arrays)."""
        p = np.empty_like(params)
        s = np.empty_like(self.opt_state)
        steps = self._backend.store_state(p, s)
        return p, s, steps

    def _lrs(self, first: int, count: int):
        """(learning rates of epochs first..first+count-1 as float64, None), or the rates before the first
        bad value and that value's error. A constant rate is checked once, not once per epoch (per-epoch
        Python work dominated 1000-epoch fits of small networks)."""
        if isinstance(self._schedule, Constant):
            return np.full(count, self._lr_at(first), dtype=np.float64), None
        lrs = []
        for e in range(count):
            try:
                lrs.append(self._lr_at(first + e))
            except (TypeError, ValueError) as error:
                return np.array(lrs, dtype=np.float64), error
        return np.array(lrs, dtype=np.float64), None

    def _record_many(self, history: History, first: int, losses, lrs, seconds: float) -> None:
        """_record for consecutive epochs, with list.extend (same content as calling _record per epoch)."""
        epochs = range(first, first + len(losses))
        losses = np.asarray(losses, dtype=np.float64).tolist()
        lrs = np.asarray(lrs, dtype=np.float64).tolist()
        for h in (history, self.history):
            h.epoch.extend(epochs)
            h.loss.extend(losses)
            h.lr.extend(lrs)
            h.time.extend([seconds] * len(losses))

    def _record(self, history: History, epoch: int, loss: float, lr: float, seconds: float) -> None:
        self._record_many(history, epoch, [loss], [lr], seconds)

    def _nonfinite(self, epoch: int, loss: float, lr: float, on_nonfinite: str) -> None:
        message = (f"training loss became {loss} in epoch {epoch} (lr={lr:.4g}); the model was restored to the "
                   f"end of the last epoch with a finite loss. Try a lower learning rate.")
        if on_nonfinite == "raise":
            raise NonFiniteLossError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _accuracy(self, predictions: np.ndarray, Y: np.ndarray) -> float:
        Y = self._backend.to_host(Y)
        if self.loss == "softmax_cross_entropy":
            return float(np.mean(predictions.argmax(axis=1) == Y.argmax(axis=1)))
        return float(np.mean((predictions > 0.5) == (Y > 0.5)))

    def predict(self, X) -> np.ndarray:
        """The network's transformed output for X (n, n_in): raw values (mse), sigmoid probabilities
        (binary_cross_entropy) or softmax probabilities (softmax_cross_entropy), shape (n, n_out).

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([4, 8, 3], seed=0), loss="softmax_cross_entropy")
        >>> proba = trainer.predict(np.ones((5, 4)))
        >>> proba.shape, bool(np.allclose(proba.sum(axis=1), 1))
        ((5, 3), True)
        """
        Xc = self._backend.as_input(self._inputs(X))
        params = self._begin()
        try:
            return np.asarray(self._backend.predict(Xc, self.n_outputs))
        finally:
            self._end(params)

    def evaluate(self, X, y) -> dict:
        """``{"loss": mean loss}``, plus ``"accuracy"`` for the classification losses.

        X (n, n_in); y as for :meth:`fit` (class ids (n,) or rows (n, n_out)).

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 4, 2], seed=0), loss="softmax_cross_entropy")
        >>> sorted(trainer.evaluate(np.zeros((3, 2)), [0, 1, 1]))
        ['accuracy', 'loss']
        """
        Xc, Yc = self._data(X, y)
        params = self._begin()
        try:
            scores = {"loss": self._backend.loss_value(Xc, Yc)}
            if self.loss != "mse":
                scores["accuracy"] = self._accuracy(np.asarray(self._backend.predict(Xc, self.n_outputs)), Yc)
            return scores
        finally:
            self._end(params)

    def loss_and_grads(self, X, y):
        """The mean loss over X, y and its exact gradients, shaped like the parameters; no update.

        Returns ``(loss, dweights, dbiases)`` with ``dweights[l].shape == model.weights[l].shape``
        (n_in, n_out) and ``dbiases[l].shape == (n_out,)``.

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([3, 5, 1], "tanh", seed=0), loss="mse")
        >>> loss, dweights, dbiases = trainer.loss_and_grads(np.ones((4, 3)), np.zeros(4))
        >>> [g.shape for g in dweights], [g.shape for g in dbiases]
        ([(3, 5), (5, 1)], [(5,), (1,)])
        """
        Xc, Yc = self._data(X, y)
        params = self._begin()
        try:
            loss, grads = self._backend.loss_and_grads(Xc, Yc)
        finally:
            self._end(params)
        grads = np.asarray(grads)
        layout = self.model.layout
        dweights, dbiases = [], []
        for layer in range(layout.n_layers):
            w, b = layout.views(grads, layer)
            dweights.append(w.copy())
            dbiases.append(b.copy())
        return loss, dweights, dbiases

    def choose_learning_rate(self, X, y, candidates=(1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001), *,
                             epochs: int = 5, validation_data=None, validation_fraction: float = 0.2):
        """Pick the learning rate with the lowest validation loss after a short training run.

        Each candidate trains a copy of the current model (same initial weights, same shuffling seed) for
        ``epochs`` epochs on the training part; neither the model nor this trainer changes. Without
        ``validation_data``, the last ``validation_fraction`` of a seeded shuffle of X is held out.
        A candidate whose loss diverges scores inf. Returns a :class:`LearningRateSearch`; use its
        ``best_lr`` with ``trainer.set_lr(best_lr)`` or a new Trainer.

        >>> import numpy as np, fastbp
        >>> X = np.random.default_rng(0).normal(size=(200, 2)); y = (X[:, 0] > 0).astype(int)
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 8, 2], seed=0), loss="softmax_cross_entropy", seed=0)
        >>> search = trainer.choose_learning_rate(X, y, candidates=(0.3, 1e-4), epochs=3)
        >>> search.best_lr, [row["lr"] for row in search.table]
        (0.3, [0.3, 0.0001])
        >>> trainer.set_lr(search.best_lr)
        """
        if isinstance(candidates, (str, bytes)) or not hasattr(candidates, "__iter__"):
            raise TypeError(f"candidates must be a sequence of learning rates like (0.1, 0.01); got "
                            f"{type(candidates).__name__} {candidates!r}")
        candidates = [check_float(f"candidates[{i}]", c, minimum=0.0, exclusive_minimum=True)
                      for i, c in enumerate(candidates)]
        if not candidates:
            raise ValueError("candidates must name at least one learning rate; got an empty sequence")
        epochs = check_int("epochs", epochs, minimum=1)
        self.model.check_parameters()
        # Check everything before any training: the data, then the validation set or the split.
        Xh, Yh = self._check_data(X, y)
        if validation_data is None:
            fraction = check_float("validation_fraction", validation_fraction, minimum=0.0, maximum=1.0,
                                   exclusive_minimum=True, exclusive_maximum=True)
            n = Xh.shape[0]
            n_val = int(round(n * fraction))
            if n_val < 1 or n_val >= n:
                raise ValueError(f"validation_fraction={fraction} of {n} samples leaves no training or no "
                                 "validation samples")
            order = np.random.default_rng(self.seed).permutation(n)
            train_idx, val_idx = order[:-n_val], order[-n_val:]
            X_train, y_train = Xh[train_idx], Yh[train_idx]
            validation_data = (Xh[val_idx], Yh[val_idx])
        else:
            validation_data = self._check_validation_data(validation_data)
            X_train, y_train = Xh, Yh
        table = []
        for lr in candidates:
            trial = self._clone(lr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                history = trial.fit(X_train, y_train, epochs=epochs, on_nonfinite="warn")
            diverged = history.stop_reason == "nonfinite"
            scores = trial.evaluate(*validation_data)
            row = {"lr": lr, "train_loss": history.loss[-1] if history.loss and not diverged else np.inf,
                   "val_loss": np.inf if diverged or not np.isfinite(scores["loss"]) else scores["loss"]}
            if "accuracy" in scores:
                row["val_accuracy"] = scores["accuracy"]
            table.append(row)
        best = min(table, key=lambda row: row["val_loss"])
        return LearningRateSearch(best_lr=best["lr"], table=table)

    def _clone(self, lr) -> "Trainer":
        """A fresh trainer with the same settings on a copy of the model (optimizer state reset)."""
        return Trainer(self.model.copy(), loss=self.loss, optimizer=self.optimizer, lr=lr, momentum=self.momentum,
                       dampening=self.dampening, nesterov=self.nesterov, weight_decay=self.weight_decay,
                       betas=self.betas, eps=self.eps, batch_size=self.batch_size, device=self.device,
                       seed=self.seed)

    def set_lr(self, lr) -> None:
        """Change the learning rate (a number or an ``epoch -> lr`` callable) for later epochs.

        >>> import fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", lr=0.1)
        >>> trainer.set_lr(fastbp.ExponentialDecay(0.1, gamma=0.9))
        """
        self._schedule = self._check_lr(lr)
        self.lr = lr

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the model, optimizer state, schedule and its position, the shuffling RNG's state, the
        hyper-parameters and the history to one ``.npz`` file (atomically, no pickle).

        Loading it and training on gives exactly the weights an uninterrupted run would have. A custom
        (user-written) lr callable cannot be stored: :meth:`Trainer.load` then needs ``lr=``.

        >>> import os, tempfile, numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 3, 1], seed=0), loss="mse", lr=0.1, seed=0)
        >>> history = trainer.fit(np.ones((8, 2)), np.zeros(8), epochs=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
        >>> trainer.save(path)
        >>> fastbp.Trainer.load(path).epochs_done
        2
        """
        from .checkpoint import save_trainer

        save_trainer(self, path)

    @classmethod
    def load(cls, path, *, lr=None, device: str | None = None) -> "Trainer":
        """Read a trainer written by :meth:`Trainer.save`.

        lr : number or callable, optional
            Replaces the stored learning rate or schedule; required when the saved one was a custom callable.
        device : {"cpu", "cuda", "auto"}, optional
            Overrides the stored device (e.g. to resume a GPU run on a machine without one)."""
        from .checkpoint import load_trainer

        return load_trainer(path, lr=lr, device=device)
