"""The one interface every target implements: what :class:`fastbp.Trainer` asks of a backend.

A backend runs one network (a :class:`fastbp.layout.Layout`, activation codes, a loss, an optimizer and its
hyper-parameters, a dtype) on one target. It OWNS the training state between calls: the parameters it
trains and the optimizer state stay where it keeps them (host memory for the CPU, GPU memory for CUDA)
from one public call to the next. The Trainer owns everything else (step and epoch counters, the shuffling
RNG, the schedule, the history) and runs the one training loop; it never branches on the device.

Parameters travel through the model's flat host vector ``params`` (P,) (``fastbp.layout``: W0 row-major
(n_in, n_out), b0, W1, b1, ...), which is the memory the model's ``weights`` / ``biases`` are views of:

- :meth:`Backend.use_parameters` is called at the start of every public call with that vector: the
  backend makes its own copy current, and may skip the work when it can tell nothing changed (the CPU
  trains the very array, so there is nothing to copy; the GPU uploads only when the values differ from
  what it last uploaded or downloaded);
- :meth:`Backend.publish_parameters` is called after a call that trained: the backend writes its
  parameters back into that vector (nothing to do on the CPU).

A training call is one of two shapes:

- :meth:`Backend.train_epochs`: many epochs in one call, when nothing needs Python between steps (the
  CPU's compiled epoch loop; the GPU's chain of launches, or its fused whole-fit kernel);
- step by step, when something must act between a step's gradient and its update (the gradient
  Allreduce of :class:`fastbp.distributed.DataParallelTrainer`): :meth:`Backend.rows_grads` writes a
  gradient into a host buffer, the caller acts on it, :meth:`Backend.apply_update` applies it.

Data handed to a backend has been validated on the host by the Trainer (finite, the right shape) and
converted with :meth:`Backend.as_input` (a contiguous host array for the CPU, a device copy for CUDA); a GPU
array given by the user goes through :meth:`Backend.as_device_input` instead and is used in place.
"""
from __future__ import annotations

import abc

import numpy as np

from ..layout import Layout


class Backend(abc.ABC):
    """Runs training and inference for one network on one target (see the module docstring)."""

    device: str = ""  # the name Trainer(device=...) resolves to
    # Threads for the compiled CPU calls (None: numba's current setting); set by the Trainer, applied by the
    # fastbp._threads.guarded decorator around each such call.
    n_threads: int | None = None
    # True when this backend cannot run its update rule inside train_epochs, so the Trainer trains through
    # rows_grads / apply_update instead (CUDA with clip_grad_norm: the norm spans every parameter and is
    # formed on the host between a step's gradient and its update).
    steps_need_host: bool = False
    layout: Layout  # set by __init__, with dtype (numpy dtype of every buffer)
    dtype: np.dtype

    @abc.abstractmethod
    def __init__(self, layout: Layout, act_codes, loss: int, optimizer: int, hyper, dtype):
        """layout: where each layer lives in the flat buffers; act_codes (L,) int: one activation code per
        layer (pointwise.ACTIVATIONS, identity for the output layer); loss, optimizer: codes from
        pointwise.LOSSES / OPTIMIZERS; hyper (N_HYPER,) float64 indexed by pointwise.H_*; dtype: float32 or
        float64. The optimizer state starts at zero."""

    # -- training state ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def use_parameters(self, params: np.ndarray) -> None:
        """Make the backend's parameters equal to ``params`` (P,), the model's flat host vector."""

    @abc.abstractmethod
    def publish_parameters(self, params: np.ndarray) -> None:
        """Write the backend's parameters into ``params`` (P,), the vector given to use_parameters."""

    @abc.abstractmethod
    def optimizer_state(self) -> np.ndarray:
        """The optimizer state (2, P) as a host array (SGD's momentum buffer in row 0; Adam's exp_avg and
        exp_avg_sq in rows 0 and 1): the backend's own array on the CPU, a copy on a GPU."""

    @abc.abstractmethod
    def set_optimizer_state(self, state: np.ndarray) -> None:
        """Replace the optimizer state with ``state`` (2, P) (host)."""

    @abc.abstractmethod
    def snapshot(self):
        """An opaque copy of the parameters and optimizer state, kept where the backend keeps them (no
        transfer to the host): what early stopping keeps of its best epoch."""

    @abc.abstractmethod
    def restore(self, snapshot) -> None:
        """Put a :meth:`snapshot` back (parameters and optimizer state)."""

    # -- data -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def as_input(self, X: np.ndarray):
        """A validated host matrix in the form the other methods take (contiguous host array, or a device
        copy made once for the whole call)."""

    @abc.abstractmethod
    def as_device_input(self, name: str, X, n_columns: int, allow_vector: bool = False, bounds=None):
        """A GPU array given by the user, checked (2-D or, with allow_vector, 1-D; C-contiguous; the model's
        dtype; non-empty; finite; within ``bounds=(low, high)``) and used in place; a target that cannot use
        GPU arrays raises TypeError naming ``name``."""

    @abc.abstractmethod
    def to_host(self, X) -> np.ndarray:
        """X as a host array (a copy when it lives on a device)."""

    @abc.abstractmethod
    def take_rows(self, X, rows: np.ndarray, out=None):
        """X[rows] for an int64 index vector, in the backend's form (gathered on the device for a device X),
        written into ``out`` when it is an earlier result of the same shape (no new buffer each epoch)."""

    # -- training ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def train_epochs(self, X, Y, batch_size: int, orders: np.ndarray, lrs: np.ndarray, target_loss: float,
                     steps_done: int, sample_weight=None):
        """Run ``len(lrs)`` epochs of mini-batch training; returns ``(losses, completed, steps_done)``.

        sample_weight (n,) in the backend's dtype, or None: each batch's loss is sum_i w_i l_i / sum_i w_i
        over its rows (l_i the row's loss), each epoch's the same over all rows (see Trainer.fit).
        X (n, n_in), Y (n, k) from as_input; orders (E, n) int64, each epoch's sample order, or (E, 0) for
        "in order" (full batch: no reordering); lrs (E,) float64, each epoch's learning rate; steps_done:
        optimizer steps taken before this call (torch's state["step"]; bias corrections count from it).
        losses (float64): the mean loss of each epoch that ran, including a last non-finite one;
        completed: epochs kept. An epoch whose loss is not finite is undone (parameters, optimizer state
        and step count as at its start) and ends the call; so does an epoch whose loss is <= target_loss
        (that one is kept). Returns the step count after the completed epochs."""

    # -- one step at a time -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def rows_grads(self, X, Y, divisor: float, grads_out: np.ndarray, sample_weight=None) -> float:
        """grads_out (P,) (host) = gradient of (sum of the row losses of X, Y) / divisor, overwritten (zeros
        for 0 rows); returns that loss value. With divisor = a global batch's loss divisor, the gradients of
        several shards of the batch add up to the batch's gradient. With sample_weight (n,), row i's loss
        counts w_i times (and divisor is the weighted one: the weights' sum times one row's divisor)."""

    @abc.abstractmethod
    def apply_update(self, grads: np.ndarray, lr: float, step: int) -> None:
        """One optimizer update of the parameters with the flat gradient grads (P,) (host); ``step`` is this
        update's number, counted from 1 (torch's state["step"] after it)."""

    # -- inference and gradients ------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict(self, X, n_outputs: int) -> np.ndarray:
        """The loss's output transform of the network's output for X, as a new host array (n, n_outputs)."""

    @abc.abstractmethod
    def loss_value(self, X, Y, sample_weight=None) -> float:
        """The mean loss over X, Y (weighted by sample_weight (n,) when given)."""

    def predict_and_loss(self, X, Y, n_outputs: int, sample_weight=None):
        """(predict(X, n_outputs), loss_value(X, Y, sample_weight)); a backend may compute both in one pass."""
        return self.predict(X, n_outputs), self.loss_value(X, Y, sample_weight=sample_weight)

    def loss_and_grads(self, X, Y, divisor: float, sample_weight=None):
        """(mean loss, flat gradient (P,) as a new host array) over all of X, Y with the given loss divisor:
        no update."""
        grads = np.empty(self.layout.n_params, dtype=self.dtype)
        weights = {} if sample_weight is None else {"sample_weight": sample_weight}
        return self.rows_grads(X, Y, divisor, grads, **weights), grads
