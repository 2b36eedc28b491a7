"""The CUDA target's host side: ``base.Backend`` over two flat device arenas, kernels from ``fastbp.kernels``.

Where the data lives: parameters, optimizer state, gradients, the epoch backup, workspaces and per-call
tables sit in ONE float arena ``F`` and one int64 arena ``I`` on the device (``kernels.cuda_step.ArenaLayout``:
F[0:P] parameters, F[P:3P] optimizer state, F[3P:4P] gradients, F[4P:7P] the backup), plus a small float64
arena ``D`` for losses. They stay there from call to call: ``use_parameters`` uploads only when the model's
vector differs from what the device last had, ``publish_parameters`` downloads after training.

Who runs the loop:
- a narrow network (every layer <= 128 wide, kernels.cuda_fused.fused_plan) trains a whole
  ``train_epochs`` call in ONE launch of the fused kernel: epochs, steps and stopping rules on the device;
- any other network runs each step as at most L + 2 launches (2L - 1: kernels.cuda_step.build_plan) plus two
  per epoch, all of them identical from epoch to epoch: on a GPU they are captured once into a CUDA graph and
  each epoch is one replay (kernels.cuda.Graph); the direct launches are the fallback (and what the
  simulator runs). Either way the host queues every epoch of the call and synchronises ONCE, at the end
  (the stopping rules are applied on the device: later launches of the call return at once).

This module never imports the CUDA binding itself: it goes through ``fastbp.kernels``.
"""
from __future__ import annotations


import numpy as np

from ..kernels import cuda as kernels
from ..kernels import cuda_fused as fused
from ..kernels import cuda_step as step
from ..kernels.pointwise import H_CLIP, N_HYPER, loss_divisor
from ..layout import Layout
from .base import Backend

# Rows per chunk when predicting, evaluating or taking gradients of a whole data set: bounds the workspace.
EVAL_CAPACITY = 4096
# An epoch of more launches than this is not captured into a graph (launched directly instead).
GRAPH_MAX_LAUNCHES = 20000


def unavailable_reason() -> str | None:
    """None when the CUDA backend can run here (a GPU, or numba's simulator), otherwise why not."""
    return kernels.unavailable_reason()


def _divisor(loss: int, n: int, k: int, sample_weight) -> float:
    """The loss divisor of n rows: loss_divisor's, or with sample weights their float64 sum times one row's
    (inf when they sum to 0: such rows have no loss, as kernels.cpu.weighted_inv_divisor's 0)."""
    if sample_weight is None:
        return float(loss_divisor(loss, n, k))
    total = float(np.sum(sample_weight, dtype=np.float64)) * loss_divisor(loss, 1, k)
    return total if total > 0 else float("inf")


def _flat(x):
    return x.reshape(x.size) if x.size else x.reshape(0)


def _pointer(x) -> int:
    try:
        return int(x.__cuda_array_interface__["data"][0])
    except (AttributeError, KeyError, TypeError):
        return id(x)


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
        # Which training path train_epochs may take (tests switch the fused one off to test the other).
        self.use_fused = True
        self.use_graphs = kernels.graphs_unavailable_reason() is None
        self._dims = dict(capacity=1, n=1, n_steps=1, n_orders=0, n_jobs=1, scratch=0, counters=0, n_losses=1)
        self._arena = None
        self._graph = None  # (key, Graph) of the last captured epoch
        self._graph_candidate = None
        self._host_params = None  # what the device's parameters were when last uploaded or downloaded
        self._device_changed = False  # the device trained since then
        self._allocate(self._dims)

    # -- the arenas ---------------------------------------------------------------------------------------------
    def _allocate(self, dims) -> None:
        arena = step.ArenaLayout(self.layout, dims["capacity"], dims["n"], dims["n_steps"], dims["n_orders"],
                                 dims["n_jobs"], dims["scratch"], dims["counters"], 0)
        F = kernels.device_zeros(arena.f_size, self.dtype)
        I = kernels.device_zeros(arena.i_size, np.int64)
        D = kernels.device_zeros(step.D_LOSSES + dims["n_losses"], np.float64)
        if self._arena is not None:  # keep the training state: parameters, optimizer state, gradients
            F[0:7 * arena.P].copy_to_device(self._F[0:7 * arena.P])
        constants = np.zeros(step.N_HYPER_F + 2, dtype=self.dtype)
        constants[:step.N_HYPER_F] = step.hyper_values(self.hyper, self.dtype)
        constants[step.N_HYPER_F] = 1.0  # f_one
        F[arena.f_hyper:arena.f_hyper + len(constants)].copy_to_device(constants)
        self._F, self._I, self._D, self._arena, self._dims = F, I, D, arena, dict(dims)
        if self._graph is not None:
            self._graph[1].close()
        self._graph = None

    def _ensure(self, **needs) -> step.ArenaLayout:
        """The arena, grown (never shrunk) to hold ``needs`` (see ArenaLayout's arguments)."""
        if any(needs[key] > self._dims[key] for key in needs):
            self._allocate({key: max(self._dims[key], needs.get(key, 0)) for key in self._dims})
        return self._arena

    def _ctrl(self, n: int, sample_weight=None) -> np.ndarray:
        """The control words of a call over n rows; with sample_weight (n,) (host) it is uploaded to the
        arena's weights region and the tail kernel scales each row's loss and gradient by it."""
        arena = self._arena
        if sample_weight is not None:
            self._upload(self._F, arena.f_weights, sample_weight)
        ctrl = np.zeros(step.N_CTRL, dtype=np.int64)
        ctrl[step.C_P] = arena.P
        ctrl[step.C_N] = n
        ctrl[step.C_OPTIMIZER] = self.optimizer
        ctrl[step.C_NESTEROV] = step.nesterov_flag(self.hyper)
        ctrl[step.C_LOSS] = self.loss
        ctrl[step.C_I_STEPS] = arena.i_steps
        ctrl[step.C_I_JOBS] = arena.i_jobs
        ctrl[step.C_F_SCHED] = arena.f_sched
        ctrl[step.C_F_ROWS] = arena.f_rows
        ctrl[step.C_F_HYPER] = arena.f_hyper
        ctrl[step.C_F_WEIGHTS] = -1 if sample_weight is None else arena.f_weights
        return ctrl

    def _upload(self, array, offset: int, values) -> None:
        values = np.ascontiguousarray(values, dtype=array.dtype).reshape(-1)
        if values.size:
            array[offset:offset + values.size].copy_to_device(values)

    def _plan(self, capacity: int, **options):
        """A launch plan and its job table placed for the arena (grown first if the plan needs more room)."""
        while True:  # a second pass only when the first grew the arena (its slots move)
            arena = self._ensure(capacity=capacity)
            plan = step.build_plan(arena, self.act_codes, capacity, **options)
            if self._ensure(n_jobs=len(plan.jobs), scratch=plan.scratch, counters=plan.counters) is arena:
                return plan, plan.place(arena)

    # -- training state ---------------------------------------------------------------------------------------
    def use_parameters(self, params: np.ndarray) -> None:
        if self._device_changed or self._host_params is None or not np.array_equal(params, self._host_params):
            self._upload(self._F, 0, params)
            self._host_params = np.array(params, dtype=self.dtype, copy=True)
            self._device_changed = False

    def publish_parameters(self, params: np.ndarray) -> None:
        params[...] = self._F[0:self.layout.n_params].copy_to_host()
        self._host_params = np.array(params, dtype=self.dtype, copy=True)
        self._device_changed = False

    def optimizer_state(self) -> np.ndarray:
        P = self.layout.n_params
        return self._F[P:3 * P].copy_to_host().reshape(2, P)

    def set_optimizer_state(self, state: np.ndarray) -> None:
        P = self.layout.n_params
        self._upload(self._F, P, np.asarray(state).reshape(2 * P))

    def snapshot(self):
        P = self.layout.n_params
        copy = kernels.device_empty(3 * P, self.dtype)
        copy.copy_to_device(self._F[0:3 * P])
        return copy

    def restore(self, snapshot) -> None:
        P = self.layout.n_params
        self._F[0:3 * P].copy_to_device(snapshot)
        self._device_changed = True

    # -- data -------------------------------------------------------------------------------------------------
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
        ``bounds=(low, high)``, within them (a grid-wide reduction: kernels.cuda.array_stats)."""
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
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if not kernels.is_device_array(X):
            host = np.asarray(X)
            if isinstance(out, np.ndarray) and out.shape == (len(rows),) + host.shape[1:] \
                    and out.dtype == host.dtype:
                return np.take(host, rows, axis=0, out=out)
            return np.ascontiguousarray(host[rows])
        X = kernels.as_device_array(X)
        if not (kernels.is_device_array(out) and out.shape == (len(rows), X.shape[1]) and out.dtype == X.dtype):
            out = kernels.device_empty((len(rows), X.shape[1]), X.dtype)
        if len(rows) and X.shape[1]:
            with kernels.quiet_launches():
                kernels.gather_rows(out, X, kernels.to_device(rows), 0)
        return out

    # -- training ---------------------------------------------------------------------------------------------
    def train_epochs(self, X, Y, batch_size: int, orders: np.ndarray, lrs: np.ndarray, target_loss: float,
                     steps_done: int, sample_weight=None):
        if self.steps_need_host:
            raise RuntimeError("CUDABackend.train_epochs cannot clip gradients; train through rows_grads and "
                               "apply_update (fastbp.Trainer does so when steps_need_host is True)")
        n, k = X.shape[0], Y.shape[1]
        E = len(lrs)
        capacity = max(1, min(int(batch_size), n))
        per_epoch = -(-n // capacity)
        n_steps = E * per_epoch
        in_order = orders.shape[1] == 0
        self._ensure(capacity=capacity, n=n, n_steps=n_steps, n_orders=0 if in_order else E * n, n_losses=E)
        # Weighted fits take the step launches (the fused kernel has no per-row weights yet).
        fused_plan = (fused.fused_plan(self.layout, capacity, self.dtype)
                      if self.use_fused and sample_weight is None else None)
        if fused_plan is not None:
            self._ensure(n_jobs=1 + len(fused.network_words(self.layout, self.act_codes)))
            plan = table = None
        else:
            plan, table = self._plan(capacity, rows_from_step=True)
        arena = self._arena
        order_offsets = [-1] * E if in_order else [arena.i_orders + e * n for e in range(E)]
        steps, sched = step.step_schedule(self.layout, self.loss, self.optimizer, self.hyper, lrs, n, k, capacity,
                                          int(steps_done), order_offsets, self.dtype, sample_weight, orders)
        F, I, D = self._F, self._I, self._D
        self._upload(I, 0, self._ctrl(n, sample_weight))
        self._upload(I, arena.i_steps, steps)
        if not in_order:
            self._upload(I, arena.i_orders, orders)
        self._upload(F, arena.f_sched, sched)
        self._upload(D, 0, [target_loss, _divisor(self.loss, n, k, sample_weight)])
        Xf, Yf = _flat(X), _flat(Y)
        with kernels.quiet_launches():
            if fused_plan is not None:
                self._fused_fit(fused_plan, E, per_epoch, Xf, Yf)
            else:
                self._run_epochs(plan, table, E, per_epoch, Xf, Yf, (n, capacity, in_order))
        ctrl = I[0:step.N_CTRL].copy_to_host()  # the one synchronisation of the call
        losses = D[step.D_LOSSES:step.D_LOSSES + E].copy_to_host()
        ran = int(ctrl[step.C_EPOCHS_RUN])
        completed = ran - 1 if ctrl[step.C_STOP] == step.STOP_NONFINITE else ran
        self._device_changed = True
        return losses[:ran].astype(np.float64), completed, int(steps_done) + completed * per_epoch

    def _fused_fit(self, fused_plan, E: int, per_epoch: int, Xf, Yf) -> None:
        chunk, staged, shared = fused_plan
        arena = self._arena
        words = fused.network_words(self.layout, self.act_codes)
        job = np.zeros(step.N_JOB, dtype=np.int64)
        job[[fused.FZ_NET, fused.FZ_CHUNK, fused.FZ_UNITS, fused.FZ_STAGED, fused.FZ_EPOCHS, fused.FZ_STEPS]] = (
            arena.i_jobs + step.N_JOB, chunk, arena.units, int(staged), E, per_epoch)
        self._upload(self._I, arena.i_jobs, np.concatenate((job, words)))
        kernels.launch(fused.fused_fit_kernel(), 1, fused.FUSED_THREADS, (self._F, self._D, self._I, Xf, Yf), shared)

    def _epoch_records(self, plan, per_epoch: int, Xf, Yf):
        F, I, D = self._F, self._I, self._D
        records = [step.epoch_begin_record(F, I, self.layout.n_params)]
        step_records = step.step_launch_records(plan, F, I, Xf, Yf)
        for _ in range(per_epoch):
            records.extend(step_records)
        records.append(step.epoch_end_record(F, D, I))
        return records

    def _run_epochs(self, plan, table, E: int, per_epoch: int, Xf, Yf, shape_key) -> None:
        self._upload(self._I, self._arena.i_jobs, table)
        records = self._epoch_records(plan, per_epoch, Xf, Yf)
        key = (id(self._F), _pointer(Xf), _pointer(Yf), shape_key, table.tobytes())
        graph = None
        if self.use_graphs and len(records) <= GRAPH_MAX_LAUNCHES:
            if self._graph is not None and self._graph[0] == key:
                graph = self._graph[1]
            elif E >= 2 or self._graph_candidate == key:  # worth a capture: a second epoch with these arrays
                if self._graph is not None:
                    self._graph[1].close()
                self._graph = (key, kernels.Graph(records))
                graph = self._graph[1]
            self._graph_candidate = key
        for _ in range(E):
            if graph is not None:
                graph.replay()
            else:
                for record in records:
                    kernels.launch(*record)
        kernels.launch(*step.epoch_begin_record(self._F, self._I, self.layout.n_params))  # the last restore

    # -- one step at a time -----------------------------------------------------------------------------------
    def _chunks(self, n: int):
        capacity = max(1, min(EVAL_CAPACITY, n))
        return capacity, [(start, min(capacity, n - start)) for start in range(0, n, capacity)]

    def _eval(self, X, Y, accumulate: bool = False, sample_weight=None, **options):
        """Launch records of one plan per chunk of X's rows (static rows, jobs in one table), the control words
        and job table uploaded; returns (records, chunks). accumulate: chunks after the first add their
        weight gradients to the first's."""
        n = X.shape[0]
        capacity, chunks = self._chunks(n)
        while True:  # a second pass only when the first grew the arena (its slots move)
            arena = self._ensure(capacity=capacity, n=n)
            merged = step.LaunchPlan()
            for index, (start, rows) in enumerate(chunks):
                merged.extend(step.build_plan(arena, self.act_codes, capacity, rows_from_step=False, start=start,
                                              rows=rows, accumulate=accumulate and index > 0, **options))
            if self._ensure(n_jobs=len(merged.jobs), scratch=merged.scratch, counters=merged.counters) is arena:
                break
        self._upload(self._I, 0, self._ctrl(n, sample_weight))
        self._upload(self._I, arena.i_jobs, merged.place(arena))
        Xf = _flat(X)
        Yf = _flat(Y) if Y is not None else Xf  # predict reads no targets
        return step.step_launch_records(merged, self._F, self._I, Xf, Yf), chunks

    def rows_grads(self, X, Y, divisor: float, grads_out: np.ndarray, sample_weight=None) -> float:
        n = X.shape[0]
        P = self.layout.n_params
        if n == 0:  # an empty shard contributes nothing: zeros, not the previous gradient
            if kernels.is_device_array(grads_out):
                kernels.as_device_array(grads_out).copy_to_device(np.zeros(P, dtype=self.dtype))
            else:
                grads_out[...] = 0
            return 0.0
        records, _ = self._eval(X, Y, accumulate=True, sample_weight=sample_weight, train=True, update=False,
                                advance=False)
        arena = self._arena
        self._upload(self._F, arena.f_inv, [1.0 / float(divisor)])
        with kernels.quiet_launches():
            for record in records:
                kernels.launch(*record)
            kernels.launch(*step.loss_sum_record(self._F, self._D, arena.f_rows, n))
        grads = self._F[3 * P:4 * P]
        if kernels.is_device_array(grads_out):
            kernels.as_device_array(grads_out).copy_to_device(grads)
        else:
            grads_out[...] = grads.copy_to_host()
        return float(self._D[step.D_EVAL:step.D_EVAL + 1].copy_to_host()[0]) / float(divisor)

    @property
    def steps_need_host(self) -> bool:
        # Gradient clipping needs the norm of the whole gradient before any parameter is updated, which the
        # fused launches (the update sits in the weight gradient's epilogue) cannot wait for: a clipped fit runs
        # through rows_grads / apply_update, which clips on the host with the CPU's own kernel.
        return self.hyper[H_CLIP] > 0.0

    def apply_update(self, grads: np.ndarray, lr: float, step_number: int) -> None:
        P = self.layout.n_params
        arena = self._arena
        if self.hyper[H_CLIP] > 0.0:
            from ..kernels import cpu

            host = (kernels.as_device_array(grads).copy_to_host() if kernels.is_device_array(grads)
                    else np.array(grads, dtype=self.dtype))  # a copy: the caller's gradient is left as it was
            cpu.clip_grad_norm(host, float(self.hyper[H_CLIP]))
            grads = host
        if kernels.is_device_array(grads):
            self._F[3 * P:4 * P].copy_to_device(kernels.as_device_array(grads))
        else:
            self._upload(self._F, 3 * P, grads)
        t = float(step_number)
        sched = np.zeros(step.N_STEP_F, dtype=np.float64)
        sched[step.SF_LR] = lr
        step.fill_adam_scalars(sched, self.optimizer, self.hyper, float(lr), t)
        rows = np.zeros(step.N_STEP_I, dtype=np.int64)
        rows[step.S_FIRST] = int(step_number == 1)
        self._upload(self._I, 0, self._ctrl(1))
        self._upload(self._I, arena.i_steps, rows)
        self._upload(self._F, arena.f_sched, sched)
        with kernels.quiet_launches():
            kernels.launch(*step.update_record(self._F, self._I, P, 0))
        self._device_changed = True

    # -- inference --------------------------------------------------------------------------------------------
    def predict(self, X, n_outputs: int) -> np.ndarray:
        n = X.shape[0]
        k = int(self.layout.sizes[-1])
        out = np.empty((n, n_outputs), dtype=self.dtype)
        if n == 0:
            return out
        records, chunks = self._eval(X, None, train=False, predict=True)
        per_chunk = len(records) // len(chunks)
        slot = self._arena.slot(self._arena.f_deltas, self.layout.n_layers)
        with kernels.quiet_launches():
            for index, (start, rows) in enumerate(chunks):
                for record in records[index * per_chunk:(index + 1) * per_chunk]:
                    kernels.launch(*record)
                out[start:start + rows] = self._F[slot:slot + rows * k].copy_to_host().reshape(rows, k)[:, :n_outputs]
        return out

    def loss_value(self, X, Y, sample_weight=None) -> float:
        n, k = X.shape[0], Y.shape[1]
        if n == 0:
            return float("nan")
        records, _ = self._eval(X, Y, sample_weight=sample_weight, train=False)
        with kernels.quiet_launches():
            for record in records:
                kernels.launch(*record)
            kernels.launch(*step.loss_sum_record(self._F, self._D, self._arena.f_rows, n))
        return float(self._D[step.D_EVAL:step.D_EVAL + 1].copy_to_host()[0]) / _divisor(self.loss, n, k, sample_weight)
