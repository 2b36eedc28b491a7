"""The CPU target's host side: flat buffers in host memory, kernels from ``fastbp.kernels.cpu``.

It trains the model's own flat parameter vector in place (``use_parameters`` keeps a reference, nothing is
copied), and keeps the optimizer state between calls.
"""
from __future__ import annotations

from collections import OrderedDict

import numba
import numpy as np

from .._jit import Entry, fill_now, prefetch, read_only, take_unstarted
from .._threads import guarded
from ..kernels import cpu as kernels
from ..kernels import narrow
from ..kernels.pointwise import N_HYPER
from ..layout import Layout
from ..losses import LOSSES
from .base import Backend

# Rows per chunk when predicting or evaluating a whole data set: bounds the workspace, not the result.
EVAL_CAPACITY = 4096
# Workspaces kept between calls, least recently used dropped first. A fit needs one (its batch size; the fused
# narrow kernel's gradient buffers are a second), its validation one more; calls over other row counts get a
# power-of-two capacity (eval_capacity), so a server answering requests of any size cycles through at most 13
# capacities (1 .. EVAL_CAPACITY) and holds at most MAX_WORKSPACES of them. Before this bound, every distinct
# row count kept its own workspace for the trainer's lifetime: 40 predicts of different sizes on a
# 1024-1024-1024-10 network grew a process from 193 to 1321 MiB resident (issue 27).
MAX_WORKSPACES = 4

# The product engine's tiled worker (gemm.task_by_symbol) is optional: until it is compiled, the engine's products
# run its plain product (the same numbers; see gemm.product), 1.4-2x slower in a small network's epoch (32-64-64-5,
# 64-128-10) and 7.6x in a 784-256-256-10 one (8192 rows, batch 128: 490 against 65 ms; AMD EPYC Zen 4). A call of
# gemm.TILES_PAY_AFTER multiply-adds or more waits for the worker instead (_jit.fill_now), and so does
# every call of a network of TILES_FIRST_PARAMS parameters or more, whose helper compiles the worker and the
# parallel region (also optional) first, not last: its products are large enough for the tiles and two threads
# to pay from the first call (784-256-256-10: 270 000 parameters; 64-128-10, the demo's digits network: 9 610).
# Compiled last, the region missed the cache of every script that ended before the helper reached it: such a
# network then trained on one thread in every new process (a W3 epoch 851 against 487 ms). Started before the
# script ends, it reaches the cache (a helper finishes the function it is compiling).
TILES_FIRST_PARAMS = 1 << 16

# The drivers, as this backend calls them: the first call per dtype compiles in a compile session, on two
# processes when the disk cache is cold (fastbp._jit, "compile sessions").
_train_epochs = Entry(kernels.train_epochs)
# forward_pass as predict (no targets), as the loss (no output) and as both: each its own specialisation (numba
# prunes the branches of an argument typed None), so each its own first-call compile session.
_predict = Entry(kernels.forward_pass)
_loss = Entry(kernels.forward_pass)
_predict_and_loss = Entry(kernels.forward_pass)
_dataset_grads = Entry(kernels.dataset_grads)


def _epochs_run(losses: np.ndarray, completed: int, target_loss: float) -> int:
    """How many of the epochs' losses the kernels wrote. They stop early after a non-finite epoch (not counted in
    ``completed``; its loss is written, and reported) or after an epoch whose loss is <= target_loss (counted;
    nothing is written after it). Reporting one entry more after a target stop, as this backend did, handed the
    trainer an unwritten float: where the memory held a NaN, a fit that had reached its target raised
    NonFiniteLossError (seen once in CI)."""
    if completed < len(losses) and not (completed and losses[completed - 1] <= target_loss):
        return completed + 1
    return completed


def eval_capacity(n_rows: int) -> int:
    """The workspace capacity of a predict / evaluate / gradient call over n_rows rows: the smallest power of
    two >= n_rows, at most EVAL_CAPACITY (larger calls run EVAL_CAPACITY rows at a time). Rounding up costs
    at most twice the rows' activations and bounds the distinct capacities to log2(EVAL_CAPACITY) + 1."""
    return min(EVAL_CAPACITY, 1 << max(0, n_rows - 1).bit_length())


class CPUBackend(Backend):
    """Runs training and inference for one network on the CPU (see :class:`fastbp.backends.base.Backend`)."""

    device = "cpu"

    def __init__(self, layout: Layout, act_codes, loss: int, optimizer: int, hyper, dtype):
        self.layout = layout
        self.act_codes = np.asarray(act_codes, dtype=np.int64)
        self.loss = int(loss)
        self.optimizer = int(optimizer)
        self.hyper = np.asarray(hyper, dtype=np.float64).reshape(N_HYPER)
        self.dtype = np.dtype(dtype)
        self._workspaces = OrderedDict()  # (capacity, n_outputs) -> Workspace fields, least recently used first
        # The drivers take the Network and each Workspace as plain tuples (see kernels.cpu.train_epochs).
        self._network = tuple(kernels.network(layout, self.act_codes, self.loss))
        self.params = np.zeros(layout.n_params, dtype=self.dtype)
        self.opt_state = np.zeros((2, layout.n_params), dtype=self.dtype)
        # Narrow networks (every layer <= narrow.NARROW_MAX_WIDTH units) train in one fused loop nest per block of
        # samples (fastbp/kernels/narrow.py: 2.1-7x the general path where it is chosen; see narrow.supports).
        # Its first call per dtype compiles in a session (fastbp._jit.Entry): the functions it calls by symbol
        # (narrow.kernel_slots) then come from the helper process started below.
        narrow_key = narrow.kernel_key(self.act_codes, self.loss) if narrow.supports(layout.sizes) else None
        self._narrow_kernel = Entry(narrow.kernel_for(self.act_codes, self.loss)) if narrow_key else None
        self._narrow_work = None
        # the drivers' "no sample weights" (read-only, as the training drivers get the data: see _jit.read_only)
        self._no_weights = read_only(np.empty(0, dtype=self.dtype))
        # Every trainer predicts on the product engine, and a wide one fits there too: where the disk cache
        # lacks their worker, loss and optimizer, a helper process starts compiling them now (fastbp._jit.prefetch).
        # A narrow trainer's helper takes the fused kernel's callees first (its fit compiles the kernel meanwhile),
        # then what a predict needs, then the loss (an evaluation's).
        # Last, the versions of forward_pass it calls after a fit: predict and its validation scores.
        classifies = any(spec.code == self.loss and spec.is_classification for spec in LOSSES.values())
        scores = kernels.forward_pass_predict_and_loss if classifies else kernels.forward_pass_loss  # Trainer._scores
        # The output transform of this trainer's loss (filled on request), after the leaves a fit needs: a cold
        # first predict compiles it here while the helper compiles the product (see _call).
        self._transform = kernels.transform_for(self.loss)
        then = [self._transform, kernels.forward_pass_predict, scores]
        # The product engine's tiled worker is optional (its plain product does the work until then): compiled
        # after everything else, or first for a large network (TILES_FIRST_PARAMS).
        self._numba_dtype = numba.from_dtype(self.dtype)
        self._tiles_first = narrow_key is None and layout.n_params >= TILES_FIRST_PARAMS
        # What the products of this network's activations call by a slot that no compile session fills (the
        # sigmoid and tanh of the product engine, which a relu network never compiles): filled before the first
        # driver call (_call), compiled by the helper first.
        self._on_request = kernels.gemm.activations_on_request(self.act_codes)
        if narrow_key:
            prefetch([kernels.forward_pass], self._numba_dtype, then=then,
                     first=narrow.kernel_slots(narrow_key) + self._on_request + [kernels.gemm.product])
        else:
            first = [kernels.gemm.task_by_symbol, kernels.gemm.parallel_tasks] if self._tiles_first else []
            prefetch([kernels.train_epochs, kernels.forward_pass], self._numba_dtype, first=self._on_request + first,
                     then=then)

    def _call(self, entry: Entry, multiply_adds: int, *args, transforms: bool = False):
        """``entry(*args)``, a driver call of about ``multiply_adds`` multiply-adds in its products (and, with
        ``transforms``, the loss's output transform). The functions it calls by a slot filled on request are put
        there first (the output transform compiled here before the driver where the helper has not started it: the
        driver's session waits for the helper's product, during which this process would otherwise be idle),
        and where the product engine's tiled worker is not compiled yet and the call should wait for it
        (TILES_PAY_AFTER, or a large network: TILES_FIRST_PARAMS), so is the worker; the driver is compiled first
        (in its session, the helper may be compiling them meanwhile). The parallel region is not waited for: a
        later call loads it (a cold 784-256-256-10 fit of 5 epochs waited 0.4 s for it and took 0.91x the time)."""
        dtype = self._numba_dtype
        if transforms and dtype not in self._transform._results:
            take_unstarted(self._transform, dtype)
            entry.prepare(*args)
            fill_now(self._transform, dtype)
        for function in self._on_request:
            if dtype not in function._results:
                entry.prepare(*args)
                fill_now(function, dtype)
        if dtype not in kernels.gemm.task_by_symbol._results and (
                self._tiles_first or multiply_adds >= kernels.gemm.TILES_PAY_AFTER):
            entry.prepare(*args)
            fill_now(kernels.gemm.task_by_symbol, dtype)
        return entry(*args)

    # -- training state -----------------------------------------------------------------------------------------
    def use_parameters(self, params: np.ndarray) -> None:
        self.params = params  # trained in place: the model's own memory

    def publish_parameters(self, params: np.ndarray) -> None:
        if params is not self.params:
            params[...] = self.params

    def optimizer_state(self) -> np.ndarray:
        return self.opt_state

    def set_optimizer_state(self, state: np.ndarray) -> None:
        self.opt_state[...] = state

    def snapshot(self):
        return self.params.copy(), self.opt_state.copy()

    def restore(self, snapshot) -> None:
        params, opt_state = snapshot
        self.params[...] = params
        self.opt_state[...] = opt_state

    # -- data ---------------------------------------------------------------------------------------------
    def as_input(self, X) -> np.ndarray:
        return np.ascontiguousarray(X, dtype=self.dtype)

    def as_device_input(self, name: str, X, n_columns: int, allow_vector: bool = False, bounds=None):
        raise TypeError(f"{name} is a GPU array; the CPU device needs a host array (numpy): copy it to the "
                        "host, or train with device='cuda'")

    def to_host(self, X) -> np.ndarray:
        return np.asarray(X)

    def take_rows(self, X, rows: np.ndarray, out=None) -> np.ndarray:
        if out is None or out.shape != (len(rows),) + X.shape[1:]:
            out = np.empty((len(rows),) + X.shape[1:], dtype=X.dtype)
        return np.take(X, rows, axis=0, out=out)

    def _workspace(self, capacity: int, n_outputs: int) -> tuple:
        """The fields of a kernels.Workspace for batches of up to ``capacity`` rows, as a plain tuple (see
        _network): a kept one, or a new one (the least recently used is dropped beyond MAX_WORKSPACES, so memory
        stays bounded whatever row counts arrive)."""
        key = (capacity, n_outputs)
        work = self._workspaces.get(key)
        if work is None:
            while len(self._workspaces) >= MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
            work = self._workspaces[key] = tuple(kernels.make_workspace(self.layout, capacity, n_outputs,
                                                                        self.dtype))
        else:
            self._workspaces.move_to_end(key)
        return work

    # -- training -----------------------------------------------------------------------------------------
    @guarded
    def train_epochs(self, X, Y, batch_size: int, orders: np.ndarray, lrs: np.ndarray, target_loss: float,
                     steps_done: int, sample_weight=None):
        """All len(lrs) epochs in one compiled call (see Backend.train_epochs)."""
        X, Y = read_only(X), read_only(Y)
        losses = np.empty(len(lrs), dtype=np.float64)
        steps = np.array([steps_done], dtype=np.int64)
        layout = self.layout
        # Weighted fits take the general path (the fused narrow kernel has no per-row weights yet).
        if self._narrow_kernel is not None and sample_weight is None:
            work = kernels.Workspace(*self._workspace(1, Y.shape[1]))  # grads and backup only
            completed = self._narrow_kernel(
                self.params, self.opt_state, steps, work.grads, work.backup,
                self._narrow_workspace(X.shape[0] if orders.shape[1] == 0 else 0), X, Y, orders, lrs, losses,
                layout.sizes, layout.param_offsets, layout.unit_offsets, self.act_codes, self.optimizer, self.hyper,
                batch_size, target_loss)
            return losses[:_epochs_run(losses, completed, target_loss)], int(completed), int(steps[0])
        work = self._workspace(batch_size, Y.shape[1])
        completed = self._call(
            _train_epochs, 3 * X.shape[0] * len(lrs) * layout.n_params,  # forward, weight and input gradients
            self.params, self.opt_state, steps, losses, X, Y, self._weights(sample_weight), orders, lrs,
            self._network, work, (self.optimizer, self.hyper, int(batch_size), float(target_loss)))
        return losses[:_epochs_run(losses, completed, target_loss)], int(completed), int(steps[0])

    def _narrow_workspace(self, n_samples: int) -> np.ndarray:
        """The fused kernel's block workspace, with room to hold a full-batch data set transposed into lane
        blocks when n_samples > 0 (kept while the row count stays the same)."""
        work = self._narrow_work
        if work is None or len(work) != narrow.workspace_length(self.layout.sizes, self.dtype, n_samples):
            work = self._narrow_work = narrow.make_workspace(self.layout.sizes, self.dtype, n_samples)
        return work

    # -- inference and gradients --------------------------------------------------------------------------
    def _weights(self, sample_weight) -> np.ndarray:
        # The drivers take sample weights as an array, empty for none (one compiled version for both).
        return self._no_weights if sample_weight is None else read_only(sample_weight)

    # predict, loss_value and predict_and_loss: one driver (kernels.forward_pass). X as the caller holds it: a
    # read-only view would cost 6% of a one-row predict (see fastbp._jit.read_only).
    @guarded
    def predict(self, X, n_outputs: int) -> np.ndarray:
        work = self._workspace(eval_capacity(X.shape[0]), n_outputs)
        out = np.empty((X.shape[0], n_outputs), dtype=self.dtype)
        self._call(_predict, X.shape[0] * self.layout.n_params,
                   out, X, None, self._no_weights, self.params, self._network, work, transforms=True)
        return out

    @guarded
    def loss_value(self, X, Y, sample_weight=None) -> float:
        work = self._workspace(eval_capacity(X.shape[0]), Y.shape[1])
        return float(self._call(_loss, X.shape[0] * self.layout.n_params,
                                None, X, read_only(Y), self._weights(sample_weight), self.params, self._network, work))

    @guarded
    def predict_and_loss(self, X, Y, n_outputs: int, sample_weight=None):
        work = self._workspace(eval_capacity(X.shape[0]), n_outputs)
        out = np.empty((X.shape[0], n_outputs), dtype=self.dtype)
        loss = self._call(_predict_and_loss, X.shape[0] * self.layout.n_params,
                          out, X, read_only(Y), self._weights(sample_weight), self.params, self._network, work,
                          transforms=True)
        return out, float(loss)

    # -- one step at a time (for callers that must act between steps, e.g. an allreduce) --------------------
    @guarded
    def rows_grads(self, X, Y, divisor: float, grads_out, sample_weight=None) -> float:
        """grads_out (P,) = gradient of (sum of the row losses of X, Y) / divisor (see Backend.rows_grads)."""
        # A power of two: callers whose row count varies per step (one rank's share of a global batch)
        # reuse a few workspaces instead of building one per count.
        work = self._workspace(eval_capacity(X.shape[0]), Y.shape[1])
        return float(self._call(_dataset_grads, 3 * X.shape[0] * self.layout.n_params,
                                grads_out, read_only(X), read_only(Y), self._weights(sample_weight), self.params,
                                self._network, work, float(divisor)))

    @guarded
    def apply_update(self, grads, lr: float, step: int) -> None:
        kernels.optimizer_step(self.params, self.opt_state, grads, float(lr), self.optimizer, self.hyper, int(step))
