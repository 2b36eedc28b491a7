"""The Trainer: the one training loop, over a backend chosen once for the device.

``Trainer.fit`` is the only implementation of epochs, validation, stopping rules, schedules, callbacks,
progress, the non-finite restore, interrupt safety and the history. What runs the epochs is the backend
(``fastbp.backends``): many epochs in one compiled call when nothing needs Python between steps, or step by
step through the *step hook* below when something does (``DataParallelTrainer``'s gradient Allreduce).

The Trainer owns its state: the model's parameters (trained where the backend keeps them, see
``fastbp.backends.base``), the optimizer state (kept by the backend), the step and epoch counters, the
shuffling RNG, the learning rate or schedule and the history. :meth:`Trainer.state_dict` lists all of it in
one place; checkpoints write that dict.
"""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _compile_notice, backends, checkpoint, schedules
from ._blas_free import sum_of_products
from ._interrupt import deferred_keyboard_interrupt
from ._threads import check_n_threads
from ._validation import as_float_matrix, check_bool, check_choice, check_float, check_int, is_gpu_array, shown
from .kernels.pointwise import (
    H_BETA1,
    H_BETA2,
    H_CLIP,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    N_HYPER,
    OPTIMIZERS,
)
from .losses import LOSS_HINTS, LOSSES
from .model import MLP
from .schedules import Constant

# Bound on the int64 sample orders generated for one multi-epoch call (8 bytes each).
MAX_ORDER_ENTRIES = 1 << 22
# Target length of one multi-epoch call: a compiled call cannot be interrupted, so this bounds how long Ctrl-C
# waits (the interrupt is delivered after the call, once its epochs are recorded).
CHUNK_SECONDS = 0.25
# Before any epoch is timed, the first call is sized from a deliberately pessimistic guess of an epoch's cost:
# 3 multiply-adds per parameter per row (forward, input and weight gradients) at 2 ns each (0.5 GFLOP/s, far
# below every CPU path's measured speed) plus a fixed cost per step (a compiled step, or a Python round trip
# for trainers that return to Python between steps). Small networks then run a whole fit in one call (W1's
# 1000 epochs: 1 call instead of 5, whose entries cost more than the epochs themselves).
GUESS_SECONDS_PER_MULTIPLY_ADD = 2e-9
GUESS_SECONDS_PER_STEP = {False: 2e-6, True: 200e-6}
# torch.optim's defaults: SGD and Adam weight_decay=0, AdamW weight_decay=1e-2.
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 0.01}
# The settings a Trainer is constructed with, as state_dict()["trainer"] lists them.
SETTINGS = ("loss", "optimizer", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "batch_size",
            "device", "seed", "n_threads", "clip_grad_norm")
# Settings added after format version 1 was first written, with the value a state without them means.
LATER_SETTINGS = {"n_threads": None, "clip_grad_norm": None}
HISTORY_LISTS = ("epoch", "loss", "val_loss", "val_accuracy", "lr", "time")
# The optimizer settings and their defaults (torch.optim's), and which optimizer reads which: a setting the
# chosen optimizer does not read must keep its default, or the Trainer refuses it (torch.optim.Adam has no
# momentum argument at all: Trainer(optimizer="adam", momentum=0.9) trained exactly as momentum=0 before).
OPTIMIZER_SETTING_DEFAULTS = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "betas": (0.9, 0.999),
                              "eps": 1e-8}
OPTIMIZER_SETTINGS = {"sgd": ("momentum", "dampening", "nesterov"), "adam": ("betas", "eps"),
                      "adamw": ("betas", "eps")}
# What a setting is called in the optimizers that have no such setting, for the error message.
_INSTEAD = {"momentum": "Adam's momentum is betas[0]", "dampening": "Adam has no dampening",
            "nesterov": "Adam has no Nesterov variant", "betas": "SGD's momentum is momentum=",
            "eps": "SGD has no eps"}
# device names users of other libraries try (check_choice shows the hint instead of the closest spelling).
DEVICE_HINTS = {name: "Did you mean 'cuda' (an NVIDIA GPU; 'auto' picks it when one is usable)?"
                for name in ("gpu", "cuda:0", "nvidia", "gpu:0", "cuda0")}


def _refuse_unused_settings(optimizer: str, **settings) -> None:
    """Raise if a setting the optimizer does not read was given a value other than its default."""
    for name, value in settings.items():
        if name not in OPTIMIZER_SETTINGS[optimizer] and value != OPTIMIZER_SETTING_DEFAULTS[name]:
            users = [o for o, names in OPTIMIZER_SETTINGS.items() if name in names]
            raise ValueError(f"{name}={shown(value)} has no effect with optimizer={optimizer!r} "
                             f"({_INSTEAD[name]}); {name} applies to optimizer="
                             f"{' or '.join(repr(o) for o in users)}. Leave it out, or choose that optimizer.")
    if optimizer == "sgd" and settings["momentum"] == 0.0 and settings["dampening"] != 0.0:
        raise ValueError(f"dampening={shown(settings['dampening'])} has no effect without momentum (it damps the "
                         "momentum buffer); set momentum > 0 or leave dampening out")


def _refuse_cpu_threads_on_gpu(n_threads, device: str) -> None:
    if n_threads is not None and not backends.MAKES_CPU_CALLS[device]:
        raise ValueError(f"n_threads={n_threads} has no effect with device={device!r}: it sets the threads of CPU "
                         "calls and a GPU trainer makes none. Leave n_threads=None, or use device='auto' (n_threads "
                         "then applies when the CPU is chosen)")


def _reports_compiling(call: str):
    """Decorator of the Trainer's public calls: a call that compiles fastbp's kernels for more than a second
    says so once per process, on stderr (fastbp._compile_notice)."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            with _compile_notice.watching(lambda: f"Trainer.{call} with {self._compile_words()}"):
                return method(self, *args, **kwargs)
        return wrapper
    return decorate


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

    def __repr__(self) -> str:
        """A one-line summary (every list in full is in ``as_dict()`` or the attributes).

        >>> History(epoch=[0, 1, 2], loss=[0.9, 0.5, 0.4], lr=[0.1] * 3, time=[0.01] * 3)
        History(3 epochs (0-2), loss 0.9 -> 0.4, lr 0.1, 0.01 s/epoch, stop_reason='epochs')
        """
        n = len(self.loss)
        if n == 0:
            return f"History(no epochs, stop_reason={self.stop_reason!r})"
        span = f"{self.epoch[0]}-{self.epoch[-1]}" if len(self.epoch) == n and n > 1 else (
            f"{self.epoch[0]}" if len(self.epoch) == n else "?")
        parts = [f"{n} epoch{'s' if n != 1 else ''} ({span})",
                 f"loss {self.loss[0]:.4g} -> {self.loss[-1]:.4g}" if n > 1 else f"loss {self.loss[0]:.4g}"]
        if self.val_loss:
            best = int(np.argmin(self.val_loss))
            # The best epoch is named only when every epoch was validated (lists of equal length).
            where = f" at epoch {self.epoch[best]}" if len(self.val_loss) == len(self.epoch) == n else ""
            parts.append(f"val_loss {self.val_loss[-1]:.4g} (best {self.val_loss[best]:.4g}{where})")
        if self.val_accuracy:
            parts.append(f"val_accuracy {self.val_accuracy[-1]:.4g}")
        if self.lr:
            low, high = min(self.lr), max(self.lr)
            parts.append(f"lr {high:.4g}" if low == high else f"lr {self.lr[0]:.4g} -> {self.lr[-1]:.4g}")
        if self.time:
            parts.append(f"{sum(self.time) / len(self.time):.3g} s/epoch")
        return f"History({', '.join(parts)}, stop_reason={self.stop_reason!r})"


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
    """Early stopping on the validation loss: keeps a snapshot of the best epoch's state (where the backend
    keeps it) and counts the epochs since."""

    def __init__(self, trainer: "Trainer", patience: int):
        self.trainer = trainer
        self.patience = patience
        self.best_loss = np.inf
        self.best_state = None  # (backend snapshot, steps done)
        self.since_best = 0

    def should_stop(self, val_loss: float) -> bool:
        """Record this epoch's validation loss; True once ``patience`` epochs passed without a new best."""
        if val_loss < self.best_loss:
            self.best_loss = val_loss
            self.best_state = self.trainer._backend.snapshot(), self.trainer.steps_done
            self.since_best = 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def restore(self) -> None:
        """Put the best epoch's parameters, optimizer state and step count back into the trainer."""
        if self.best_state is not None:
            snapshot, steps = self.best_state
            self.trainer._backend.restore(snapshot)
            self.trainer.steps_done = steps
            self.trainer._publish_parameters()


@dataclass
class _FitPlan:
    """Everything fit checked and converted, before anything changes."""

    X: object  # (n_local, n_in), the backend's form
    Y: object  # (n_local, k)
    epochs: int
    target: float | None
    patience: int | None
    restore_best: bool
    callbacks: list
    on_nonfinite: str
    verbose: object
    validation: tuple | None
    sample_weight: object = None  # (n_local,) in the backend's form, or None (every weight 1)
    shuffle_requested: bool = True  # fit's shuffle argument (False: batches in row order)
    # Set when the fit starts (collectively, in a distributed trainer):
    n: int = 0  # rows per epoch over every process (the data's rows in one process)
    batch_size: int = 0
    shuffle: bool = False  # whether the epochs draw orders: requested and more than one batch


class Trainer:
    """Trains an :class:`MLP` with a fused loss, an optimizer and a learning-rate schedule.

    Parameters
    ----------
    model : MLP
        The network; its ``weights`` / ``biases`` are read at the start of every call and hold the result.
    loss : {"mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"}
        Defined as PyTorch's ``MSELoss``, ``BCEWithLogitsLoss``, ``CrossEntropyLoss`` and
        ``PoissonNLLLoss(log_input=True)`` with ``reduction="mean"``. mse: mean over all elements of
        ``(out - y)**2``, identity output. binary_cross_entropy: mean over all elements of
        ``-[y log q + (1-y) log(1-q)]``, ``q = sigmoid(z)``. softmax_cross_entropy: mean over samples of
        ``-log softmax(z)[label]``; ``y`` holds integer class ids ``(n,)`` or one-hot / class-probability rows
        ``(n, k)``. poisson: mean over all elements of ``exp(z) - y z`` for counts (or rates) ``y >= 0``; the
        output is the rate ``exp(z)`` (the log link).
    optimizer : {"sgd", "adam", "adamw"}
        Exactly ``torch.optim.SGD(lr, momentum, dampening, weight_decay, nesterov)``,
        ``torch.optim.Adam(lr, betas, eps, weight_decay)`` (weight decay as L2 added to the gradient) and
        ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` (decoupled: ``p *= 1 - lr * weight_decay`` before
        the Adam step).
    weight_decay : float or None
        None means the optimizer's default, as in torch: 0 for "sgd" and "adam", 0.01 for "adamw".
    lr : float or callable ``epoch -> lr``
        A constant rate, a schedule from :mod:`fastbp.schedules` (``ExponentialDecay``, ``StepDecay``,
        ``CosineDecay``) or any callable of the epoch number (0-based, counted across fits). A
        :class:`fastbp.ReduceLROnPlateau` callback scales it (``lr_scale``).
    batch_size : int or None
        Mini-batch size; ``None`` is full-batch gradient descent. The last partial batch is used.
    device : {"cpu", "cuda", "auto"}
    seed : int or None
        Seeds the per-epoch shuffling (the same on every device).
    n_threads : int or None
        Threads for this trainer's compiled CPU calls (fit, evaluate, predict, loss_and_grads), from 1 to
        ``numba.config.NUMBA_NUM_THREADS``: each call runs under ``numba.set_num_threads(n_threads)`` and the
        caller's ``numba.get_num_threads()`` is restored after it, also when it raises (numba keeps the count
        per Python thread, so other threads are not affected; fit's callbacks run with the caller's count).
        ``None`` (default) runs on up to numba's count, leaving out the cores that other processes keep busy
        (measured between calls from /proc/stat on Linux: with one of two cores taken by another job, a
        784-256-256-10 epoch runs on one thread, 1.54x its idle time instead of 1.66x, or 1.6x instead of
        3-4.3x on numba's OpenMP layer). Results do not depend on the thread count (bit-identical). It
        can be changed later (``trainer.n_threads = 2``). Refused with ``device="cuda"`` (a GPU trainer makes no
        CPU calls); with ``device="auto"`` it applies when the CPU is chosen.
    clip_grad_norm : float or None
        Clip each step's gradient to this 2-norm over all parameters, exactly as
        ``torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)`` called between ``backward()``
        and ``step()``: every gradient is multiplied by ``min(1, c / (||g|| + 1e-6))``, before SGD's or Adam's
        L2 term (AdamW's decoupled decay is not a gradient term and is not clipped). ``None`` (default): no
        clipping. On the GPU a clipped fit runs step by step (the norm is formed on the host each step).

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

    def __init__(self, model: MLP, loss: str, optimizer: str = "sgd", lr=0.01, *, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float | None = None,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, batch_size: int | None = 32,
                 device: str = "cpu", seed: int | None = None, n_threads: int | None = None,
                 clip_grad_norm: float | None = None):
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastbp.MLP; got {type(model).__name__}")
        self.model = model
        self.loss = check_choice("loss", loss, LOSSES, hints=LOSS_HINTS)
        self._loss_spec = LOSSES[self.loss]
        self.optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.lr = lr
        self._schedule = self._check_lr(lr)
        momentum = check_float("momentum", momentum, minimum=0.0)
        dampening = check_float("dampening", dampening, minimum=0.0, maximum=1.0)
        if weight_decay is None:
            weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        weight_decay = check_float("weight_decay", weight_decay, minimum=0.0)
        check_bool("nesterov", nesterov)
        if self.optimizer == "sgd" and nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0 (as in torch.optim.SGD); "
                             f"got momentum={momentum}, dampening={dampening}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        beta1 = check_float("betas[0]", betas[0], minimum=0.0, maximum=1.0, exclusive_maximum=True)
        beta2 = check_float("betas[1]", betas[1], minimum=0.0, maximum=1.0, exclusive_maximum=True)
        eps = check_float("eps", eps, minimum=0.0, exclusive_minimum=True)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
        check_choice("device", device, backends.DEVICES, hints=DEVICE_HINTS)
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        n_threads = check_n_threads("n_threads", n_threads)
        _refuse_cpu_threads_on_gpu(n_threads, device)
        self.device = backends.resolve_device(device)
        if clip_grad_norm is not None:
            clip_grad_norm = check_float("clip_grad_norm", clip_grad_norm, minimum=0.0, exclusive_minimum=True)
        self._clip_grad_norm = clip_grad_norm
        _refuse_unused_settings(self.optimizer, momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                                betas=(beta1, beta2), eps=eps)
        self.momentum, self.dampening, self.nesterov = momentum, dampening, bool(nesterov)
        self.weight_decay, self.betas, self.eps = weight_decay, (beta1, beta2), eps

        hyper = np.zeros(N_HYPER)
        hyper[H_MOMENTUM], hyper[H_DAMPENING], hyper[H_WEIGHT_DECAY] = momentum, dampening, weight_decay
        hyper[H_NESTEROV], hyper[H_BETA1], hyper[H_BETA2], hyper[H_EPS] = float(nesterov), beta1, beta2, eps
        hyper[H_CLIP] = clip_grad_norm or 0.0
        self._rng = np.random.default_rng(seed)
        self._backend = backends.create_backend(
            self.device, layout=model.layout, act_codes=model.activation_codes(), loss=self._loss_spec.code,
            optimizer=OPTIMIZERS[self.optimizer], hyper=hyper, dtype=model.dtype)
        self._backend.n_threads = n_threads
        # ReduceLROnPlateau's state (see fastbp.schedules.ReduceLROnPlateau): its scale multiplies every rate.
        self._plateau = schedules.plateau_state()
        self.steps_done = 0  # optimizer steps taken (torch's state["step"])
        self.epochs_done = 0  # epochs completed across fits: the schedule's clock
        self.history = History()  # every epoch of every fit

    @property
    def opt_state(self) -> np.ndarray:
        """The optimizer state (2, n_params): SGD's momentum buffer in row 0, Adam's exp_avg and exp_avg_sq in
        rows 0 and 1 (the backend's own array on the CPU, a host copy of the GPU's)."""
        return self._backend.optimizer_state()

    @property
    def clip_grad_norm(self) -> float | None:
        """The gradient-norm bound (None: no clipping); fixed at construction, like the optimizer."""
        return self._clip_grad_norm

    @property
    def n_threads(self) -> int | None:
        """Threads of this trainer's compiled CPU calls (None: numba's current setting); see :class:`Trainer`."""
        return self._backend.n_threads

    @n_threads.setter
    def n_threads(self, value) -> None:
        value = check_n_threads("n_threads", value)
        _refuse_cpu_threads_on_gpu(value, self.device)
        self._backend.n_threads = value

    @property
    def lr_scale(self) -> float:
        """The factor :class:`fastbp.ReduceLROnPlateau` has reduced the learning rate by (1.0 until it acts).
        Every epoch trains with ``lr_scale * lr`` (or ``lr_scale * schedule(epoch)``), also after
        :meth:`set_lr`; set it to 1.0 to undo the reductions."""
        return self._plateau["scale"]

    @lr_scale.setter
    def lr_scale(self, value) -> None:
        self._plateau = self._plateau | {"scale": check_float("lr_scale", value, minimum=0.0,
                                                              exclusive_minimum=True)}

    def __repr__(self) -> str:
        model = self.model
        acts = model.activations[0] if len(set(model.activations)) == 1 else list(model.activations)
        parts = [f"MLP({list(model.sizes)}, activation={acts!r})", f"loss={self.loss!r}",
                 f"optimizer={self.optimizer!r}", f"lr={self.lr!r}", f"batch_size={self.batch_size!r}"]
        if self.lr_scale != 1.0:
            parts.append(f"lr_scale={self.lr_scale!r}")
        defaults = OPTIMIZER_SETTING_DEFAULTS | dict(weight_decay=DEFAULT_WEIGHT_DECAY[self.optimizer], device="cpu",
                                                     seed=None, n_threads=None, clip_grad_norm=None)
        if model.dtype != np.float32:
            parts.append(f"dtype={model.dtype.name}")
        for name, default in defaults.items():
            if getattr(self, name) != default:
                parts.append(f"{name}={getattr(self, name)!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def _compile_words(self) -> str:
        """What this trainer's kernels are compiled for, in a few words (for the compile notice)."""
        model = self.model
        acts = "/".join(dict.fromkeys(model.activations)) or "no hidden"
        return (f"a {'-'.join(map(str, model.sizes))} {acts} network ({model.dtype.name}, {self.loss}, "
                f"{self.optimizer})")

    # -- arguments ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_lr(lr):
        if callable(lr):
            return lr
        return Constant(check_float("lr", lr, minimum=0.0, exclusive_minimum=True))

    def _lr_at(self, epoch: int) -> float:
        """The rate epoch ``epoch`` trains with: the schedule's, times the plateau scale. A schedule may reach 0
        (CosineDecay with eta_min=0: an epoch that changes nothing, as in torch); a number lr must be > 0."""
        lr = self._schedule(epoch)
        try:
            lr = check_float(f"lr schedule at epoch {epoch}", lr, minimum=0.0)
        except TypeError as error:
            raise TypeError(f"the lr schedule must return a number; at epoch {epoch} it returned {lr!r}") from error
        return lr * self._plateau["scale"]

    @property
    def n_outputs(self) -> int:
        return self.model.sizes[-1]

    def _inputs(self, X, name: str = "X"):
        """X checked: a host array becomes a C-contiguous (n, n_in) matrix of the model's dtype (not yet on the
        device); a GPU array is checked on the device and used in place, without a copy."""
        if is_gpu_array(X):
            return self._backend.as_device_input(name, X, self.model.sizes[0])
        return as_float_matrix(name, X, self.model.dtype, n_columns=self.model.sizes[0])

    def _targets(self, y, n_samples: int, name: str = "y"):
        """Targets checked (the loss table's rules), as a (n, k) float matrix in the kernels' form."""
        spec, k = self._loss_spec, self.n_outputs
        if is_gpu_array(y):
            spec.check_device_targets(tuple(y.shape), k, name)
            Y = self._backend.as_device_input(name, y, k, allow_vector=True, bounds=spec.device_bounds)
            if Y.shape[0] != n_samples:
                raise ValueError(f"{name} has {Y.shape[0]} samples but X has {n_samples}")
            return Y
        return spec.targets(y, n_samples, k, self.model.dtype, name)

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

    # -- parameters in and out of the backend ---------------------------------------------------------------
    def _use_model_parameters(self, finite: bool = True) -> None:
        """Start of a public call: the backend's parameters become the model's current ones (the CPU trains the
        model's own memory; a GPU uploads only what changed)."""
        self.model.check_parameters(finite=finite)
        self._backend.use_parameters(self.model._training_vector())

    def _publish_parameters(self) -> None:
        """After training: the model's arrays hold the backend's parameters."""
        self._backend.publish_parameters(self.model._flat)
        self.model._after_training()

    # -- the one training loop ------------------------------------------------------------------------------
    def fit(self, X, y, epochs: int = 1, *, validation_data=None, target_loss: float | None = None,
            patience: int | None = None, restore_best: bool = True, callbacks=(), on_nonfinite: str = "raise",
            verbose: bool | int = False, sample_weight=None, shuffle: bool = True):
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
            ``restore_best`` (default True) the weights of the best epoch are put back. Needs
            ``validation_data``; ``restore_best=False`` without ``patience`` is refused (it would do nothing).
        callbacks : sequence of callables ``callback(trainer, history) -> bool | None``
            Called after every epoch; returning True stops training. ``fastbp.ReduceLROnPlateau(...)`` is one.
        on_nonfinite : {"raise", "warn"}
            If an epoch's loss is NaN or inf, the model is restored to the previous epoch and a
            :class:`NonFiniteLossError` is raised (or a RuntimeWarning issued and fit returns).
        verbose : bool or int
            0 / False (default): silent. True / 1: a :class:`fastbp.progress.ProgressBar` on stderr (a bar
            on a terminal; about 20 plain lines per fit otherwise). 2: a plain line every epoch.
        sample_weight : array (n,) or None
            Per-row weights: each batch's loss is ``sum_i w_i l_i / sum_i w_i`` over its rows, where ``l_i``
            is the row's loss (for mse and binary cross-entropy the mean over its outputs, for softmax
            cross-entropy ``-log p[label]``); all weights 1 is the plain mean. Zero weights are allowed (a
            batch whose weights are all 0 contributes a zero gradient); negative, non-finite or all-zero
            weights are refused. The epoch losses in the history are weighted the same way; the validation
            loss is not. Both devices take them (on the GPU a weighted fit runs the per-step launches, not the
            fused narrow-network kernel).
        shuffle : bool
            True (default): every epoch visits the rows in a new random order (the trainer's RNG, seeded by
            ``seed``) when they make more than one batch. False: batches of consecutive rows in the order given
            (rows ``0..b-1``, then ``b..2b-1``, ...), the same every epoch, and the shuffling RNG does not
            advance (what scikit-learn's ``shuffle=False`` and a DataLoader without shuffling do).

        Per-epoch control (validation, patience, callbacks) runs epochs one compiled call at a time;
        without it, many epochs run inside one call (the history is recorded all the same).
        """
        return self._run_fit(self._plan_fit(X, y, epochs, validation_data, target_loss, patience, restore_best,
                                            callbacks, on_nonfinite, verbose, sample_weight, shuffle))

    def _plan_fit(self, X, y, epochs, validation_data, target_loss, patience, restore_best, callbacks,
                  on_nonfinite, verbose, sample_weight=None, shuffle=True) -> _FitPlan:
        """Every argument of fit checked on the host, then converted; nothing is changed."""
        epochs = check_int("epochs", epochs, minimum=0)
        target = check_float("target_loss", target_loss, allow_none=True)
        patience = check_int("patience", patience, minimum=1, allow_none=True)
        restore_best = check_bool("restore_best", restore_best)
        shuffle = check_bool("shuffle", shuffle)
        check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
        if patience is not None and validation_data is None:
            raise ValueError("patience (early stopping) needs validation_data=(X_val, y_val)")
        if patience is None and not restore_best:
            raise ValueError("restore_best=False has no effect without early stopping: it decides whether the best "
                             "epoch's weights are put back when patience= stops training. Pass patience= too, or "
                             "leave restore_best out")
        callbacks = self._check_callbacks(callbacks)
        Xh, Yh = self._check_data(X, y)
        weights = self._sample_weight(sample_weight, Xh.shape[0])
        validation = None if validation_data is None else self._check_validation_data(validation_data)
        self.model.check_parameters()
        if validation is not None:
            validation = tuple(self._backend.as_input(a) for a in validation)
        return _FitPlan(X=self._backend.as_input(Xh), Y=self._backend.as_input(Yh), epochs=epochs, target=target,
                        patience=patience, restore_best=restore_best, callbacks=callbacks,
                        on_nonfinite=on_nonfinite, verbose=verbose, validation=validation, sample_weight=weights,
                        shuffle_requested=shuffle)

    # Whether this process's weights may all be 0 (a subclass that checks their sum over processes says yes).
    _local_weights_may_all_be_zero = False

    def _sample_weight(self, sample_weight, n: int):
        """sample_weight checked: None, or a contiguous (n,) host vector of the model's dtype (None when every
        weight is 1: the same loss, and the fastest path). Refused: wrong shape, negative, non-finite or
        all-zero weights."""
        if sample_weight is None:
            return None
        if is_gpu_array(sample_weight):
            raise TypeError("sample_weight must be a host array (numpy); got a GPU array")
        try:
            w = np.asarray(sample_weight, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"sample_weight must be an array of numbers; got {type(sample_weight).__name__}") from None
        if w.shape != (n,):
            raise ValueError(f"sample_weight must have shape ({n},), one weight per row of X; got shape {w.shape}")
        if not np.all(np.isfinite(w)):
            raise ValueError("sample_weight must be finite; got NaN or inf")
        if n and w.min() < 0:
            raise ValueError(f"sample_weight must be >= 0; got a minimum of {float(w.min())}")
        if n and not w.any() and not self._local_weights_may_all_be_zero:
            raise ValueError("sample_weight must not be all zero (the weighted mean loss would be 0 / 0)")
        if np.all(w == 1.0):
            return None
        return np.ascontiguousarray(w, dtype=self.model.dtype)

    @_reports_compiling("fit")
    def _run_fit(self, plan: _FitPlan) -> "History":
        plan.n = n = self._rows_per_epoch(plan.X.shape[0])
        plan.batch_size = n if self.batch_size is None else min(self.batch_size, n)
        # A full batch's gradient does not depend on the order: shuffling it would only draw permutations.
        plan.shuffle = plan.shuffle_requested and plan.batch_size < n
        callbacks = list(plan.callbacks)
        progress = None
        if plan.verbose and self._prints():
            from .progress import ProgressBar

            progress = ProgressBar(plan.epochs, n_samples=plan.n, mode="lines" if plan.verbose == 2 else "auto",
                                   every=1 if plan.verbose == 2 else None)
            callbacks.append(progress)
        # Epochs per call: one with per-epoch control; otherwise a first guess, then CHUNK_SECONDS a call
        # (Ctrl-C waits at most about that long) within the memory bound on the sample orders.
        # Decided from the arguments alone, never from whether this process prints: under MPI every rank
        # must take the same chunks and the same stop votes (a vote only on the printing rank deadlocks).
        hooks_each_epoch = bool(plan.callbacks) or bool(plan.verbose)
        per_epoch_control = plan.validation is not None or hooks_each_epoch
        max_chunk = 1 if per_epoch_control else (max(1, MAX_ORDER_ENTRIES // n) if plan.shuffle
                                                 else max(1, plan.epochs))
        chunk = 1 if per_epoch_control else self._first_chunk(plan, max_chunk)
        history = History()
        early = _EarlyStopping(self, plan.patience) if plan.patience is not None else None
        self._use_model_parameters(finite=False)  # checked by _plan_fit
        try:
            remaining = plan.epochs
            while remaining > 0:
                count = min(chunk, remaining)
                first = self.epochs_done
                # The schedule is asked once per epoch, just before its chunk (it may read state that callbacks
                # change). A bad value stops fit at that epoch: the epochs before it still run, then the error
                # is raised with the model at the end of the last good epoch.
                lrs, schedule_error = self._lrs(first, count)
                if len(lrs) == 0:
                    raise schedule_error
                count = len(lrs)
                # The training call and the record of what it did form one step that Ctrl-C cannot split: an
                # interrupt is delivered after it, when parameters, optimizer state, epoch counter, shuffling
                # RNG and history all describe the same last completed epoch.
                with deferred_keyboard_interrupt():
                    rng_state = self._rng.bit_generator.state
                    try:
                        orders = (np.stack([self._rng.permutation(n) for _ in range(count)]) if plan.shuffle
                                  else np.empty((count, 0), dtype=np.int64))
                        started = time.perf_counter()
                        losses, completed, steps = self._train_epochs(plan, orders, lrs)
                    except BaseException:
                        self._rng.bit_generator.state = rng_state
                        raise
                    per_epoch = (time.perf_counter() - started) / max(1, len(losses))
                    self._record_many(history, first, losses[:completed], lrs[:completed], per_epoch)
                    self.epochs_done += completed
                    self.steps_done = steps
                    remaining -= completed
                    if completed < count:  # the RNG advances only for epochs that were kept
                        self._rng.bit_generator.state = rng_state
                        for _ in range(completed if plan.shuffle else 0):
                            self._rng.permutation(n)
                    if completed < count and not np.isfinite(losses[-1]):
                        history.stop_reason = "nonfinite"
                        self._nonfinite(first + completed, losses[-1], lrs[completed], plan.on_nonfinite)
                        break
                    if plan.target is not None and completed and losses[completed - 1] <= plan.target:
                        history.stop_reason = "target_loss"
                        break
                    if plan.validation is not None:
                        scores = self._scores(*plan.validation)
                        for h in (history, self.history):
                            h.val_loss.append(scores["loss"])
                            if "accuracy" in scores:
                                h.val_accuracy.append(scores["accuracy"])
                        if early is not None and early.should_stop(scores["loss"]):
                            history.stop_reason = "early_stopping"
                            break
                    if hooks_each_epoch:  # callbacks (and a trainer.save inside one) see the current state
                        self._publish_parameters()
                if schedule_error is not None:
                    raise schedule_error
                if hooks_each_epoch and self._any_rank(any([bool(cb(self, history)) for cb in callbacks])):
                    history.stop_reason = "callback"
                    break
                # Next chunk: about CHUNK_SECONDS at the pace just measured, growing at most 8-fold a call.
                chunk = int(max(1, min(max_chunk, chunk * 8, CHUNK_SECONDS / max(per_epoch, 1e-9))))
        finally:
            with deferred_keyboard_interrupt():  # never a half-copied model
                self._publish_parameters()
            if progress is not None:
                progress.close(history)
        if history.stop_reason == "early_stopping" and plan.restore_best:
            with deferred_keyboard_interrupt():
                early.restore()
        return history

    def _train_epochs(self, plan: _FitPlan, orders: np.ndarray, lrs: np.ndarray):
        """(losses, completed, steps_done) of len(lrs) epochs: the backend's many-epoch call, or step by step
        when the step hook needs Python between a gradient and its update."""
        target = -np.inf if plan.target is None else plan.target
        if not (self.steps_need_python or self._backend.steps_need_host):
            weights = {} if plan.sample_weight is None else {"sample_weight": plan.sample_weight}
            return self._backend.train_epochs(plan.X, plan.Y, plan.batch_size, orders, lrs, target, self.steps_done,
                                              **weights)
        return self._train_epochs_stepwise(plan, orders, lrs, target)

    # -- the step hook ---------------------------------------------------------------------------------------
    # A subclass that must act between each step's gradient and its update sets steps_need_python = True and
    # overrides the methods below (fastbp.distributed.DataParallelTrainer: its data is one shard of the
    # epoch's rows, the gradient is summed over processes, and so are losses and scores). fit then runs its
    # epochs through _train_epochs_stepwise: per step, the backend's rows_grads, _reduce_gradient, then the
    # backend's apply_update. Everything else in fit is the same code for every trainer.
    steps_need_python = False

    def _rows_per_epoch(self, n_local: int) -> int:
        """Rows of one epoch over every process, given this one's (collective in a subclass)."""
        return n_local

    def _local_batches(self, order, n_local: int, batch_starts: np.ndarray, n: int):
        """(rows, row_starts) of one epoch of n rows over every process: which of this process's rows it visits,
        in order (None: all of them, in order), and where each global batch's share starts in that sequence
        (row_starts[b]:row_starts[b+1])."""
        return order, np.append(batch_starts, n)

    def _reduce_gradient(self, grads: np.ndarray) -> None:
        """Called with each step's gradient (P,) (host) before the update; may change it in place."""

    def _reduce_sum(self, values) -> np.ndarray:
        """The sums over every process of a few float64 values (here: the values)."""
        return np.asarray(values, dtype=np.float64)

    def _any_rank(self, flag: bool) -> bool:
        """Whether any process says yes (here: this one)."""
        return flag

    def _prints(self) -> bool:
        """Whether this process shows progress."""
        return True

    def _epoch_done(self, seconds: float, steps: int) -> None:
        """Called after each step-by-step epoch (for a subclass's timings)."""

    def _train_epochs_stepwise(self, plan: _FitPlan, orders: np.ndarray, lrs: np.ndarray, target: float):
        """Backend.train_epochs' contract, one optimizer step at a time through the step hook."""
        backend, spec, k = self._backend, self._loss_spec, self.n_outputs
        n, batch_size, n_local = plan.n, plan.batch_size, plan.X.shape[0]
        batch_starts = np.arange(0, n, batch_size, dtype=np.int64)
        divisors = [float(spec.divisor(min(batch_size, n - start), k)) for start in batch_starts]
        epoch_divisor = float(spec.divisor(n, k))
        # Weighted (on any process: one whose weights are all 1 passes None and counts its rows as 1 each): a
        # batch's divisor is its weight sum over every process times one row's divisor, as train_epochs forms it.
        weighted = self._any_rank(plan.sample_weight is not None)
        if weighted:
            local_weights = (np.ones(n_local, dtype=self.model.dtype) if plan.sample_weight is None
                             else plan.sample_weight)
            row_divisor = float(spec.divisor(1, k))
            epoch_divisor = float(self._reduce_sum([local_weights.sum(dtype=np.float64)])[0]) * row_divisor
        if getattr(self, "_step_grads", None) is None:
            self._step_grads = np.zeros(self.model.n_params, dtype=self.model.dtype)  # the one gradient buffer
        grads = self._step_grads
        losses, completed, steps = [], 0, self.steps_done
        shard = self._shard_buffers = getattr(self, "_shard_buffers", (None, None))
        for epoch in range(len(lrs)):
            started = time.perf_counter()
            snapshot, step0 = backend.snapshot(), steps
            rows, row_starts = self._local_batches(orders[epoch] if plan.shuffle else None, n_local, batch_starts, n)
            if rows is None:
                Xe, Ye = plan.X, plan.Y
            else:
                shard = (backend.take_rows(plan.X, rows, shard[0]), backend.take_rows(plan.Y, rows, shard[1]))
                Xe, Ye = shard
            if weighted:
                We = local_weights if rows is None else local_weights[rows]
                shares = [We[a:z].sum(dtype=np.float64) for a, z in zip(row_starts[:-1], row_starts[1:])]
                divisors = self._reduce_sum(shares) * row_divisor
            total = 0.0
            for b, divisor in enumerate(divisors):
                a, z = int(row_starts[b]), int(row_starts[b + 1])
                if divisor == 0.0:  # a batch that weighs nothing: a zero gradient, still a step (as train_epochs)
                    grads[...] = 0
                else:  # this process's rows
                    weights = {"sample_weight": We[a:z]} if weighted else {}
                    total += backend.rows_grads(Xe[a:z], Ye[a:z], float(divisor), grads, **weights) * divisor
                self._reduce_gradient(grads)
                steps += 1
                backend.apply_update(grads, float(lrs[epoch]), steps)
            loss = float(self._reduce_sum([total])[0]) / epoch_divisor
            losses.append(loss)
            if not np.isfinite(loss):  # the same on every process: undo the epoch
                backend.restore(snapshot)
                steps = step0
                break
            completed += 1
            self._epoch_done(time.perf_counter() - started, len(divisors))
            if loss <= target:
                break
        self._shard_buffers = shard
        return np.array(losses, dtype=np.float64), completed, steps

    def _first_chunk(self, plan: _FitPlan, max_chunk: int) -> int:
        """Epochs in the first compiled call: about CHUNK_SECONDS by the pessimistic guess above."""
        steps = -(-plan.n // plan.batch_size)
        guess = (3 * plan.n * self.model.n_params * GUESS_SECONDS_PER_MULTIPLY_ADD
                 + steps * GUESS_SECONDS_PER_STEP[bool(self.steps_need_python)])
        return int(max(1, min(max_chunk, CHUNK_SECONDS / guess)))

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

    def _record_many(self, history: "History", first: int, losses, lrs, seconds: float) -> None:
        """Append consecutive epochs to this fit's history and to the trainer's."""
        epochs = range(first, first + len(losses))
        losses = np.asarray(losses, dtype=np.float64).tolist()
        lrs = np.asarray(lrs, dtype=np.float64).tolist()
        for h in (history, self.history):
            h.epoch.extend(epochs)
            h.loss.extend(losses)
            h.lr.extend(lrs)
            h.time.extend([seconds] * len(losses))

    def _nonfinite(self, epoch: int, loss: float, lr: float, on_nonfinite: str) -> None:
        message = (f"training loss became {loss} in epoch {epoch} (lr={lr:.4g}); the model was restored to the "
                   f"end of the last epoch with a finite loss. Try a lower learning rate.")
        if on_nonfinite == "raise":
            raise NonFiniteLossError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _scores(self, Xc, Yc, weights=None) -> dict:
        """{"loss"} (and "accuracy" for the classification losses) over Xc, Yc (backend inputs), weighted by
        ``weights`` (n,) when given, over every process's rows (see _global_scores)."""
        spec, k, n = self._loss_spec, self.n_outputs, Xc.shape[0]
        if weights is None:  # every row weighs 1: the sums below with w = 1, without forming them
            divisor, terms = float(spec.divisor(n, k)), float(spec.accuracy_terms(n, k))
        else:
            total = float(weights.sum(dtype=np.float64))
            divisor, terms = total * spec.divisor(1, k), total * spec.accuracy_terms(1, k)
        loss = correct = 0.0
        if n:
            if divisor and spec.is_classification:  # both from one forward pass where the backend can
                predictions, loss = self._backend.predict_and_loss(Xc, Yc, self.n_outputs, sample_weight=weights)
            elif divisor:
                loss = self._backend.loss_value(Xc, Yc, sample_weight=weights)
            elif spec.is_classification:
                predictions = self._backend.predict(Xc, self.n_outputs)
            if spec.is_classification:
                Y = self._backend.to_host(Yc)
                if weights is None:
                    correct = float(spec.n_correct(predictions, Y))
                else:  # each row's right share counts w_i times (scikit-learn's accuracy_score(sample_weight=))
                    row_right = spec.row_accuracy(predictions, Y)
                    correct = sum_of_products(weights, row_right) * spec.accuracy_terms(1, k)
        return self._global_scores(loss, divisor, correct, terms)

    def _global_scores(self, loss: float, divisor: float, correct: float, terms: float) -> dict:
        """Scores from this process's (weighted) mean loss and its divisor, its (weighted) count of right
        accuracy terms and how many terms there are (a subclass combines them over processes first)."""
        scores = {"loss": float(loss)}
        if self._loss_spec.is_classification:
            scores["accuracy"] = float(correct / terms)
        return scores

    # -- inference ------------------------------------------------------------------------------------------
    @_reports_compiling("predict")
    def predict(self, X) -> np.ndarray:
        """The network's transformed output for X (n, n_in): raw values (mse), sigmoid probabilities
        (binary_cross_entropy), softmax probabilities (softmax_cross_entropy) or rates ``exp(z)`` (poisson),
        shape (n, n_out).

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([4, 8, 3], seed=0), loss="softmax_cross_entropy")
        >>> proba = trainer.predict(np.ones((5, 4)))
        >>> proba.shape, bool(np.allclose(proba.sum(axis=1), 1))
        ((5, 3), True)
        """
        Xc = self._backend.as_input(self._inputs(X))
        self._use_model_parameters(finite=False)  # NaN parameters give NaN outputs: no O(P) check per call
        return np.asarray(self._backend.predict(Xc, self.n_outputs))

    @_reports_compiling("evaluate")
    def evaluate(self, X, y, sample_weight=None) -> dict:
        """``{"loss": mean loss}``, plus ``"accuracy"`` for the classification losses.

        X (n, n_in); y as for :meth:`fit` (class ids (n,) or rows (n, n_out)). With ``sample_weight`` (n,),
        both are weighted means over the rows (``sum_i w_i l_i / sum_i w_i``, as in :meth:`fit`; each row's
        accuracy counts w_i times, as scikit-learn's ``accuracy_score(sample_weight=)``).

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 4, 2], seed=0), loss="softmax_cross_entropy")
        >>> sorted(trainer.evaluate(np.zeros((3, 2)), [0, 1, 1]))
        ['accuracy', 'loss']
        """
        Xc, Yc = self._data(X, y)
        weights = self._sample_weight(sample_weight, Xc.shape[0])
        self._use_model_parameters(finite=False)
        return self._scores(Xc, Yc, weights)

    @_reports_compiling("loss_and_grads")
    def loss_and_grads(self, X, y, sample_weight=None):
        """The mean loss over X, y and its exact gradients, shaped like the parameters; no update.

        Returns ``(loss, dweights, dbiases)`` with ``dweights[l].shape == model.weights[l].shape``
        (n_in, n_out) and ``dbiases[l].shape == (n_out,)``. With ``sample_weight`` (n,), the loss is the
        weighted mean ``sum_i w_i l_i / sum_i w_i`` (as in :meth:`fit`) and the gradients are its own.

        >>> import numpy as np, fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([3, 5, 1], "tanh", seed=0), loss="mse")
        >>> loss, dweights, dbiases = trainer.loss_and_grads(np.ones((4, 3)), np.zeros(4))
        >>> [g.shape for g in dweights], [g.shape for g in dbiases]
        ([(3, 5), (5, 1)], [(5,), (1,)])
        """
        Xc, Yc = self._data(X, y)
        weights = self._sample_weight(sample_weight, Xc.shape[0])
        self._use_model_parameters()
        if weights is None:
            loss, grads = self._backend.loss_and_grads(Xc, Yc, self._loss_spec.divisor(Xc.shape[0], self.n_outputs))
        else:
            divisor = float(weights.astype(np.float64).sum()) * self._loss_spec.divisor(1, self.n_outputs)
            loss, grads = self._backend.loss_and_grads(Xc, Yc, divisor, sample_weight=weights)
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
        ``validation_fraction`` with ``validation_data`` is refused (nothing is split off then).
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
        if validation_data is not None and validation_fraction != 0.2:
            raise ValueError(f"validation_fraction={shown(validation_fraction)} has no effect with validation_data "
                             "(nothing is split off X then); pass one or the other")
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
        return Trainer(self.model.copy(), lr=lr, **self._settings())

    def _settings(self) -> dict:
        return {name: getattr(self, name) for name in SETTINGS}

    def set_lr(self, lr) -> None:
        """Change the learning rate (a number or an ``epoch -> lr`` callable) for later epochs.

        >>> import fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", lr=0.1)
        >>> trainer.set_lr(fastbp.ExponentialDecay(0.1, gamma=0.9))
        """
        self._schedule = self._check_lr(lr)
        self.lr = lr

    def scale_momentum(self, factor: float) -> None:
        """Multiply SGD's momentum buffer by ``factor`` (>= 0), where the trainer keeps it (CPU or GPU).

        torch's buffer sums gradients and each step multiplies it by the current rate, so after a change of
        rate from ``old`` to ``new`` the velocity's steps are ``new / old`` times what they were. Libraries whose
        velocity holds the steps themselves (scikit-learn's SGD, Keras's) keep their size across the change;
        ``scale_momentum(old / new)`` together with :meth:`set_lr` gives torch's update exactly those steps
        (``fastbp.sklearn`` does so for ``learning_rate="adaptive"`` and ``"invscaling"``). Before the first
        step there is no buffer yet (the first step starts it from the gradient) and nothing changes.

        Refused (ValueError) for Adam and AdamW, whose state holds moments of the gradient that a change of
        rate leaves valid, and for SGD without momentum, which keeps no buffer.

        >>> import fastbp
        >>> trainer = fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", lr=0.1, momentum=0.9)
        >>> trainer.set_lr(0.02)
        >>> trainer.scale_momentum(0.1 / 0.02)  # the velocity keeps the steps it took at lr=0.1
        """
        factor = check_float("factor", factor, minimum=0.0)
        if self.optimizer != "sgd":
            raise ValueError(f"scale_momentum has no effect with optimizer={self.optimizer!r}: its state holds moments "
                             "of the gradient, which a change of rate leaves valid; it applies to optimizer='sgd' "
                             "with momentum > 0")
        if self.momentum == 0.0:
            raise ValueError("scale_momentum has no effect without momentum (SGD keeps no buffer then); construct the "
                             "Trainer with momentum > 0")
        state = np.array(self._backend.optimizer_state())  # a copy on every device
        state[0] *= factor
        self._backend.set_optimizer_state(state)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Every piece of training state, in one place, as plain values and copies of the arrays::

            {"model": model.state_dict(),
             "trainer": {loss, optimizer, momentum, dampening, nesterov, weight_decay, betas, eps, batch_size,
                         device, seed, n_threads, lr (the rate or schedule as data, see fastbp.schedules.to_spec),
                         steps_done, epochs_done, rng_state (the shuffling RNG's state),
                         plateau (ReduceLROnPlateau's state: scale, best, num_bad_epochs, cooldown_counter)},
             "opt_state": (2, n_params) array,
             "history": {epoch, loss, val_loss, val_accuracy, lr, time (lists), stop_reason}}

        :meth:`Trainer.from_state_dict` builds an equal trainer from it, :meth:`load_state_dict` loads it into
        this one, and :meth:`save` writes it to a file (``fastbp.checkpoint``)."""
        trainer = self._settings() | {"betas": list(self.betas), "lr": schedules.to_spec(self.lr),
                                      "steps_done": int(self.steps_done), "epochs_done": int(self.epochs_done),
                                      "rng_state": self._rng.bit_generator.state,
                                      "plateau": dict(self._plateau)}
        return {"model": self.model.state_dict(), "trainer": trainer, "opt_state": np.array(self.opt_state),
                "history": self.history.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`: the model's parameters, the optimizer state, the step and epoch counters,
        the shuffling RNG, the history, ReduceLROnPlateau's state (the lr scale), and the learning rate when it is
        a number or a built-in schedule (a custom schedule's state keeps this trainer's lr). The architecture and
        the optimizer must be this trainer's; its other settings (n_threads among them) stay as they are.
        Everything is checked before anything changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from Trainer.state_dict(); got {type(state).__name__}")
        for key in ("model", "trainer", "opt_state", "history"):
            if key not in state:
                raise ValueError(f"the state lacks the field {key!r}")
        spec = state["trainer"]
        if not isinstance(spec, dict):
            raise ValueError("trainer: must be a dict")
        get = lambda key: _field(spec, key)  # noqa: E731
        if get("optimizer") != self.optimizer:
            raise ValueError(f"trainer: the state's optimizer {get('optimizer')!r} is not this trainer's "
                             f"{self.optimizer!r}")
        lr_spec = get("lr")
        lr = None if isinstance(lr_spec, dict) and lr_spec.get("type") == "custom" else schedules.from_spec(lr_spec)
        steps = check_int("steps_done", get("steps_done"), minimum=0)
        epochs = check_int("epochs_done", get("epochs_done"), minimum=0)
        rng_state = get("rng_state")
        if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"rng_state must be a PCG64 state; got {rng_state!r:.100}")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"invalid rng_state ({error})") from None
        opt_state = np.asarray(state["opt_state"])
        shape = (2, self.model.n_params)
        if opt_state.shape != shape or opt_state.dtype != self.model.dtype:
            raise ValueError(f"opt_state must have shape {shape} and dtype {self.model.dtype.name}; got shape "
                             f"{opt_state.shape} and dtype {opt_state.dtype}")
        if not np.isfinite(opt_state).all():
            raise ValueError("opt_state contains NaN or inf")
        history = _history_from(state["history"])
        # A state written before ReduceLROnPlateau existed has no plateau entry: the initial state.
        plateau = schedules.plateau_state(spec.get("plateau"))
        self.model.load_state_dict(state["model"])  # the only write that can fail: it checks first
        self._backend.set_optimizer_state(opt_state)
        self.steps_done, self.epochs_done = steps, epochs
        self._rng.bit_generator.state = rng_state
        self.history = history
        self._plateau = plateau
        if lr is not None:
            self.set_lr(lr)

    @classmethod
    def from_state_dict(cls, state: dict, *, lr=None, device: str | None = None) -> "Trainer":
        """A new trainer (on a new model) equal to the one whose :meth:`state_dict` this is.

        lr : number or callable, optional
            Replaces the stored learning rate or schedule; required when the stored one was a custom callable.
        device : {"cpu", "cuda", "auto"}, optional
            Overrides the stored device (e.g. to resume a GPU run on a machine without one)."""
        if device is not None:
            check_choice("device", device, backends.DEVICES, hints=DEVICE_HINTS)
        if lr is not None:
            cls._check_lr(lr)
        if not isinstance(state, dict) or not isinstance(state.get("trainer"), dict) or "model" not in state:
            raise TypeError("state must be a dict from Trainer.state_dict() with 'model' and 'trainer' entries")
        try:
            model = MLP.from_state_dict(state["model"])
        except (TypeError, ValueError) as error:
            raise type(error)(f"model: {error}") from None
        spec = state["trainer"]
        try:
            stored_lr = schedules.from_spec(_field(spec, "lr")) if lr is None else lr
            settings = {name: spec.get(name, LATER_SETTINGS[name]) if name in LATER_SETTINGS else _field(spec, name)
                        for name in SETTINGS}
            if not isinstance(settings["betas"], list):
                raise ValueError(f"betas must be a list; got {settings['betas']!r}")
            settings["betas"] = tuple(settings["betas"])
            # Files written before unused settings were refused may hold, say, momentum with adam: it had no
            # effect on the training they record, so it is dropped rather than refused.
            if isinstance(settings["optimizer"], str) and settings["optimizer"] in OPTIMIZER_SETTINGS:
                for name in OPTIMIZER_SETTING_DEFAULTS:
                    if name not in OPTIMIZER_SETTINGS[settings["optimizer"]]:
                        settings[name] = OPTIMIZER_SETTING_DEFAULTS[name]
            if settings["optimizer"] == "sgd" and settings["momentum"] == 0:
                settings["dampening"] = 0.0
            settings["device"] = device or settings["device"]
            if not backends.MAKES_CPU_CALLS.get(settings["device"], True):  # a CPU run resumed on a GPU
                settings["n_threads"] = None
            trainer = cls(model, lr=stored_lr, **settings)
            trainer.load_state_dict(state)
        except (TypeError, ValueError) as error:
            raise type(error)(f"trainer: {error}") from None
        if lr is not None:
            trainer.set_lr(lr)
        return trainer

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
        self.model.check_parameters()
        checkpoint.write(path, "trainer", self.state_dict())

    @classmethod
    def load(cls, path, *, lr=None, device: str | None = None) -> "Trainer":
        """Read a trainer written by :meth:`Trainer.save`.

        lr : number or callable, optional
            Replaces the stored learning rate or schedule; required when the saved one was a custom callable.
        device : {"cpu", "cuda", "auto"}, optional
            Overrides the stored device (e.g. to resume a GPU run on a machine without one)."""
        if device is not None:
            check_choice("device", device, backends.DEVICES, hints=DEVICE_HINTS)
        if lr is not None:
            cls._check_lr(lr)
        kind, state = checkpoint.read(path)
        if kind != "trainer":
            raise checkpoint.CheckpointError(f"{checkpoint._as_path(path)!r} holds a model, not a trainer; read it "
                                             "with fastbp.MLP.load")
        try:
            with checkpoint.reported_as_checkpoint_error():
                return cls.from_state_dict(state, lr=lr, device=device)
        except RuntimeError as error:  # a GPU run resumed where there is no usable GPU
            raise RuntimeError(f"{error} To resume on the CPU: fastbp.Trainer.load(path, device='cpu').") from None


def _field(section: dict, key: str):
    if key not in section:
        raise ValueError(f"lacks the field {key!r}")
    return section[key]


def _history_from(spec) -> History:
    """A History from its as_dict() form, checked: every list of numbers, as many losses as epochs."""
    if not isinstance(spec, dict):
        raise ValueError(f"history must be a dict; got {type(spec).__name__}")
    history = History()
    for name in HISTORY_LISTS:
        if name in ("epoch", "loss") and name not in spec:
            raise ValueError(f"history lacks the field {name!r}")
        values = spec.get(name, [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            raise ValueError(f"history {name} must be a list of numbers")
        setattr(history, name, [int(v) for v in values] if name == "epoch" else [float(v) for v in values])
    n_epochs = len(history.epoch)
    for name in ("loss", "lr", "time"):
        if len(history[name]) != n_epochs:
            raise ValueError(f"history {name} has {len(history[name])} entries, epoch has {n_epochs}")
    for name in ("val_loss", "val_accuracy"):
        if len(history[name]) > n_epochs:
            raise ValueError(f"history has more {name} entries than epochs")
    stop_reason = spec.get("stop_reason", "epochs")
    if not isinstance(stop_reason, str):
        raise ValueError(f"stop_reason must be a string; got {stop_reason!r}")
    history.stop_reason = stop_reason
    return history
