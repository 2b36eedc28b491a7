"""The CUDA target's host side: flat buffers resident on the GPU, kernels from ``fastbp.kernels.cuda``.

The same interface as ``cpu.CPUBackend``. Differences are where the data lives and who runs the loop:
- parameters, optimizer state, workspaces and the training data stay on the device for a whole call;
  ``publish_parameters`` is the only copy back (the Trainer calls it after a call that trained);
- a training step is a Python-driven chain of kernel launches (gather, forward per layer, loss-gradient,
  backward per layer, optimizer update); every view into a flat buffer is built once per workspace;
- each sample's loss lands in an epoch-long device buffer and is reduced on the device: ONE scalar per
  epoch comes back (the Trainer needs it for the history, the stopping rules and the non-finite check).

This module never imports the CUDA binding itself: it goes through ``fastbp.kernels.cuda``.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels import cuda as kernels
from ..kernels.pointwise import (
    ADAM,
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    N_HYPER,
    loss_divisor,
)
from ..layout import Layout
from .base import Backend

# Rows per chunk when predicting or evaluating a whole data set: bounds the workspace, not the result.
EVAL_CAPACITY = 4096


def unavailable_reason() -> str | None:
    """None when the CUDA backend can run here (a GPU, or numba's simulator), otherwise why not."""
    return kernels.unavailable_reason()


class _Workspace:
    """Device buffers for batches of up to ``capacity`` rows, and the views the launches use."""

    def __init__(self, layout: Layout, capacity: int, n_outputs: int, dtype):
        self.layout = layout
        self.capacity = capacity
        size = layout.workspace_size(capacity)
        self.acts = kernels.device_empty(size, dtype)
        self.deltas = kernels.device_empty(size, dtype)
        self.targets_batch = kernels.device_empty((capacity, n_outputs), dtype)
        self.row_losses = kernels.device_empty(capacity, dtype)
        self.grads_chunk = kernels.device_empty(layout.n_params, dtype)
        self._views = {}

    def slot(self, buffer, layer: int, n_rows: int):
        """Layer ``layer``'s (n_rows, sizes[layer]) slot of ``acts`` or ``deltas`` (as the CPU's activation_view)."""
        start = self.capacity * int(self.layout.unit_offsets[layer])
        width = int(self.layout.sizes[layer])
        return buffer[start:start + n_rows * width].reshape(n_rows, width)

    def views(self, n_rows: int):
        """(acts slots, deltas slots) for every layer at n_rows rows; built once per row count."""
        if n_rows not in self._views:
            n_slots = self.layout.n_layers + 1
            self._views[n_rows] = ([self.slot(self.acts, l, n_rows) for l in range(n_slots)],
                                   [self.slot(self.deltas, l, n_rows) for l in range(n_slots)])
        return self._views[n_rows]


class CUDABackend(Backend):
    """Runs training and inference for one network on the GPU (or in numba's CUDA simulator)."""

    device = "cuda"

    def __init__(self, layout: Layout, act_codes, loss: int, optimizer: int, hyper, dtype):
        self.layout = layout
        self.act_codes = [int(a) for a in act_codes]
        self.loss = int(loss)
        self.optimizer = int(optimizer)
        self.hyper = np.asarray(hyper, dtype=np.float64).reshape(N_HYPER)
        self.dtype = np.dtype(dtype)
        self._workspaces = {}
        self.params = kernels.device_zeros(layout.n_params, self.dtype)
        self.opt_state = kernels.device_zeros((2, layout.n_params), self.dtype)
        self._param_views = self._layer_views(self.params)
        self._opt_rows = (self.opt_state[0], self.opt_state[1])  # views built once, not per step
        self._uploaded = None  # host copy of the parameters as last uploaded or downloaded

    # -- training state -----------------------------------------------------------------------------------------
    def use_parameters(self, params: np.ndarray) -> None:
        """Upload the model's parameters, unless they equal what the device already holds (a host compare
        of P numbers instead of a PCIe copy, and no optimizer-state traffic at all)."""
        if self._uploaded is None or not np.array_equal(params, self._uploaded):
            self.params.copy_to_device(np.ascontiguousarray(params, dtype=self.dtype))
            self._uploaded = np.array(params, dtype=self.dtype)

    def publish_parameters(self, params: np.ndarray) -> None:
        self.params.copy_to_host(params)
        self._uploaded = np.array(params)

    def optimizer_state(self) -> np.ndarray:
        return self.opt_state.copy_to_host()

    def set_optimizer_state(self, state: np.ndarray) -> None:
        self.opt_state.copy_to_device(np.ascontiguousarray(state, dtype=self.dtype))

    def snapshot(self):
        params = kernels.device_empty(self.layout.n_params, self.dtype)
        opt_state = kernels.device_empty((2, self.layout.n_params), self.dtype)
        params.copy_to_device(self.params)
        opt_state.copy_to_device(self.opt_state)
        return params, opt_state

    def restore(self, snapshot) -> None:
        params, opt_state = snapshot
        self.params.copy_to_device(params)
        self.opt_state.copy_to_device(opt_state)

    def _layer_views(self, flat):
        """[(weight (n_in, n_out), bias (n_out,))] views of a flat device vector, one pair per layer."""
        views = []
        for layer in range(self.layout.n_layers):
            n_in, n_out = int(self.layout.sizes[layer]), int(self.layout.sizes[layer + 1])
            start = int(self.layout.param_offsets[layer])
            views.append((flat[start:start + n_in * n_out].reshape(n_in, n_out),
                          flat[start + n_in * n_out:start + n_in * n_out + n_out]))
        return views

    # -- data ---------------------------------------------------------------------------------------------
    def as_input(self, X):
        """A validated host matrix, uploaded once (the caller keeps the device copy for the whole call); a
        GPU array (already checked by as_device_input) is used in place."""
        if kernels.is_device_array(X):
            return kernels.as_device_array(X)
        return kernels.to_device(np.ascontiguousarray(X, dtype=self.dtype))

    def as_device_input(self, name: str, X, n_columns: int, allow_vector: bool = False, bounds=None):
        """A GPU array (numba device array, CuPy, PyTorch CUDA tensor...) used in place, without a copy.

        Checked like a host array, on the device: 2-D (or 1-D with ``allow_vector``), C-contiguous, of the
        model's dtype (converting would be a copy: do it on the GPU first), non-empty, finite and, with
        ``bounds=(low, high)``, within them."""
        arr = kernels.as_device_array(X)
        if np.dtype(arr.dtype) != self.dtype:
            raise TypeError(f"{name} is a GPU array of dtype {np.dtype(arr.dtype)}; the model is {self.dtype}. "
                            f"Convert it on the GPU first (e.g. x.astype({self.dtype.name})) so no copy is hidden.")
        if arr.ndim == 1 and allow_vector:
            arr = arr.reshape(arr.shape[0], 1)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array; got a GPU array of shape {tuple(arr.shape)}")
        if not arr.is_c_contiguous():
            raise ValueError(f"{name} must be C-contiguous (row-major) on the GPU; make a contiguous copy first")
        if arr.shape[0] == 0:
            raise ValueError(f"{name} is empty: it has 0 samples (shape {tuple(arr.shape)})")
        if arr.shape[1] != n_columns:
            raise ValueError(f"{name} must have {n_columns} columns; got shape {tuple(arr.shape)}")
        stats = kernels.device_empty(3, self.dtype)
        with kernels.quiet_launches():
            kernels.array_stats(stats, arr.reshape(arr.size))
        n_bad, low, high = (float(v) for v in stats.copy_to_host())
        if n_bad:
            raise ValueError(f"{name} must be finite; it holds {int(n_bad)} NaN or infinite values")
        if bounds is not None and (low < bounds[0] or high > bounds[1]):
            raise ValueError(f"{name} must lie in [{bounds[0]}, {bounds[1]}]; got values from {low} to {high}")
        return arr

    def to_host(self, X) -> np.ndarray:
        return X.copy_to_host() if kernels.is_device_array(X) else np.asarray(X)

    def take_rows(self, X, rows: np.ndarray, out=None):
        """X[rows] on the device: gathered there when X lives there, else taken on the host and uploaded."""
        shape = (len(rows),) + tuple(X.shape[1:])
        if out is None or tuple(out.shape) != shape:
            out = kernels.device_empty(shape, self.dtype)
        if kernels.is_device_array(X):
            if len(rows):
                with kernels.quiet_launches():
                    kernels.gather_rows(out, X, kernels.to_device(np.ascontiguousarray(rows, dtype=np.int64)), 0)
        else:
            out.copy_to_device(np.ascontiguousarray(np.take(X, rows, axis=0), dtype=self.dtype))
        return out

    def _workspace(self, capacity: int, n_outputs: int) -> _Workspace:
        key = (capacity, n_outputs)
        if key not in self._workspaces:
            self._workspaces[key] = _Workspace(self.layout, capacity, n_outputs, self.dtype)
        return self._workspaces[key]

    # -- the launch sequence of one batch -----------------------------------------------------------------
    def _forward(self, acts, inputs):
        """Forward through every layer from ``inputs`` (n_rows, n_in); returns the logits view."""
        inp = inputs
        for layer, (weight, bias) in enumerate(self._param_views):
            kernels.dense_forward(acts[layer + 1], inp, weight, bias, self.act_codes[layer])
            inp = acts[layer + 1]
        return inp

    def _batch_grads(self, grad_views, acts, deltas, inputs, targets, row_losses, inv_divisor):
        """Forward, fused loss-gradient and backward for one batch; grads overwritten, row losses written."""
        n_layers = self.layout.n_layers
        logits = self._forward(acts, inputs)
        kernels.loss_grad(deltas[n_layers], row_losses, logits, targets, self.loss, inv_divisor)
        for layer in range(n_layers - 1, -1, -1):
            inp = inputs if layer == 0 else acts[layer]
            dweight, dbias = grad_views[layer]
            kernels.dense_backward_params(dweight, dbias, deltas[layer + 1], inp)
            if layer > 0:  # the input layer's gradient is never needed
                kernels.dense_backward_input(deltas[layer], deltas[layer + 1], self._param_views[layer][0], inp,
                                             self.act_codes[layer - 1])

    def _optimizer_step(self, grads, lr: float) -> None:
        """One update of the flat params (counts a step); bias corrections in float64 on the host, as the CPU."""
        self.steps_done += 1
        step = self.steps_done
        hyper = self.hyper
        if self.optimizer == ADAM:
            beta1, beta2 = hyper[H_BETA1], hyper[H_BETA2]
            kernels.adam_update(self.params, self._opt_rows[0], self._opt_rows[1], grads, lr, beta1, beta2,
                                hyper[H_EPS], hyper[H_WEIGHT_DECAY], lr / (1.0 - beta1 ** step),
                                math.sqrt(1.0 - beta2 ** step))
        else:
            kernels.sgd_update(self.params, self._opt_rows[0], grads, lr, hyper[H_MOMENTUM], hyper[H_DAMPENING],
                               hyper[H_WEIGHT_DECAY], hyper[H_NESTEROV] != 0.0, step == 1)

    # -- training -----------------------------------------------------------------------------------------
    def train_epochs(self, X, Y, batch_size: int, orders: np.ndarray, lrs: np.ndarray, target_loss: float,
                     steps_done: int):
        """Run len(lrs) epochs; returns (epoch_losses (reported,), completed, steps_done) (Backend.train_epochs).

        X (n, n_in), Y (n, k) on the device; orders (E, n) int64 (uploaded once) or (E, 0) for in order
        (full batch: X and Y are used as the batch, no copy). After each epoch one scalar, the epoch's
        summed loss, comes back; a non-finite epoch restores params and optimizer state from a device
        backup taken at its start."""
        n, k = X.shape[0], Y.shape[1]
        n_epochs = len(lrs)
        ws = self._workspace(batch_size, k)
        grads = self._grads()
        grad_views = self._grad_views
        epoch_rows = self._buffer("epoch_rows", n)
        totals = self._buffer("totals", max(1, n_epochs))
        backup_params = self._buffer("backup_params", self.layout.n_params)
        backup_state = self._buffer("backup_state", (2, self.layout.n_params))
        in_order = orders.shape[1] == 0
        orders_device = None if in_order else kernels.to_device(np.ascontiguousarray(orders, dtype=np.int64))
        batches = []  # (start, n_rows, inv_divisor, row-loss view)
        for start in range(0, n, batch_size):
            n_rows = min(batch_size, n - start)
            batches.append((start, n_rows, 1.0 / loss_divisor(self.loss, n_rows, k), epoch_rows[start:start + n_rows]))
        divisor = loss_divisor(self.loss, n, k)
        self.steps_done = int(steps_done)
        losses = np.empty(n_epochs, dtype=np.float64)
        completed = n_epochs
        with kernels.quiet_launches():
            for epoch in range(n_epochs):
                backup_params.copy_to_device(self.params)
                backup_state.copy_to_device(self.opt_state)
                step0 = self.steps_done
                order = None if in_order else orders_device[epoch]
                for start, n_rows, inv_divisor, row_losses in batches:
                    acts, deltas = ws.views(n_rows)
                    if in_order:
                        inputs, targets = X[start:start + n_rows], Y[start:start + n_rows]
                    else:
                        inputs, targets = acts[0], ws.targets_batch[:n_rows]
                        kernels.gather_rows(inputs, X, order, start)
                        kernels.gather_rows(targets, Y, order, start)
                    self._batch_grads(grad_views, acts, deltas, inputs, targets, row_losses, inv_divisor)
                    self._optimizer_step(grads, lrs[epoch])
                kernels.sum_into(totals, epoch, epoch_rows)
                losses[epoch] = float(totals[epoch:epoch + 1].copy_to_host()[0]) / divisor
                if not np.isfinite(losses[epoch]):
                    self.params.copy_to_device(backup_params)
                    self.opt_state.copy_to_device(backup_state)
                    self.steps_done = step0
                    completed = epoch
                    break
                if losses[epoch] <= target_loss:
                    completed = epoch + 1
                    break
        n_reported = min(completed + 1, n_epochs)
        return losses[:n_reported], int(completed), self.steps_done

    def _buffer(self, name: str, shape):
        """A named device buffer kept between calls, reallocated only when its shape changes."""
        key = "_buf_" + name
        shape = shape if isinstance(shape, tuple) else (shape,)
        buf = getattr(self, key, None)
        if buf is None or tuple(buf.shape) != shape:
            buf = kernels.device_empty(shape, self.dtype)
            setattr(self, key, buf)
        return buf

    def _grads(self):
        if getattr(self, "_buf_grads", None) is None:
            self._buf_grads = kernels.device_empty(self.layout.n_params, self.dtype)
            self._grad_views = self._layer_views(self._buf_grads)
        return self._buf_grads

    # -- inference and gradients --------------------------------------------------------------------------
    def _chunks(self, n: int):
        capacity = max(1, min(EVAL_CAPACITY, n))
        return capacity, [(start, min(capacity, n - start)) for start in range(0, n, capacity)]

    def predict(self, X, n_outputs: int) -> np.ndarray:
        capacity, chunks = self._chunks(X.shape[0])
        ws = self._workspace(capacity, n_outputs)
        out = kernels.device_empty((X.shape[0], n_outputs), self.dtype)
        with kernels.quiet_launches():
            for start, n_rows in chunks:
                acts, _ = ws.views(n_rows)
                logits = self._forward(acts, X[start:start + n_rows])
                kernels.output_transform(out[start:start + n_rows], logits, self.loss)
        return out.copy_to_host()

    def loss_value(self, X, Y) -> float:
        n, k = X.shape[0], Y.shape[1]
        capacity, chunks = self._chunks(n)
        ws = self._workspace(capacity, k)
        rows = self._buffer("eval_rows", n)
        totals = self._buffer("eval_total", 1)
        one = 1.0
        with kernels.quiet_launches():
            for start, n_rows in chunks:
                acts, deltas = ws.views(n_rows)
                logits = self._forward(acts, X[start:start + n_rows])
                kernels.loss_grad(deltas[self.layout.n_layers], rows[start:start + n_rows], logits,
                                  Y[start:start + n_rows], self.loss, one)
            kernels.sum_into(totals, 0, rows)
        return float(totals.copy_to_host()[0]) / loss_divisor(self.loss, n, k)

    # -- one step at a time (for callers that must act between steps, e.g. an allreduce) --------------------
    def rows_grads(self, X, Y, divisor: float, grads_out) -> float:
        """grads_out (P,) (host or device) = gradient of (sum of the row losses of X, Y) / divisor; returns
        that loss value; zeros for 0 rows (a rank's share of a batch may be empty)."""
        n, k = X.shape[0], Y.shape[1]
        if n == 0:
            if kernels.is_device_array(grads_out):
                kernels.as_device_array(grads_out).copy_to_device(np.zeros(self.layout.n_params, self.dtype))
            else:
                grads_out[...] = 0
            return 0.0
        capacity, chunks = self._chunks(n)
        ws = self._workspace(capacity, k)
        grads = self._grads()
        rows = self._buffer("eval_rows", n)
        totals = self._buffer("eval_total", 1)
        inv_divisor = 1.0 / divisor
        chunk_views = self._layer_views(ws.grads_chunk)
        with kernels.quiet_launches():
            for index, (start, n_rows) in enumerate(chunks):
                acts, deltas = ws.views(n_rows)
                views, target = (self._grad_views, grads) if index == 0 else (chunk_views, ws.grads_chunk)
                self._batch_grads(views, acts, deltas, X[start:start + n_rows], Y[start:start + n_rows],
                                  rows[start:start + n_rows], inv_divisor)
                if index > 0:
                    kernels.add_into(grads, target)
            kernels.sum_into(totals, 0, rows)
        if kernels.is_device_array(grads_out):
            kernels.as_device_array(grads_out).copy_to_device(grads)
        else:
            grads.copy_to_host(grads_out)
        return float(totals.copy_to_host()[0]) / divisor

    def apply_update(self, grads, lr: float, step: int) -> None:
        """One optimizer step of the params with the flat gradient grads (P,) (host or device)."""
        grads = kernels.as_device_array(grads) if kernels.is_device_array(grads) else \
            kernels.to_device(np.ascontiguousarray(grads, dtype=self.dtype))
        self.steps_done = int(step) - 1
        with kernels.quiet_launches():
            self._optimizer_step(grads, float(lr))
