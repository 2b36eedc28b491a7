"""Data-parallel training over MPI (mpi4py): one process per core, machine or GPU.

Run a script under ``mpiexec -n 4 python -m mpi4py train.py``; in it::

    from mpi4py import MPI
    import fastbp
    from fastbp.distributed import DataParallelTrainer, shard

    X_local, y_local = shard(X, y, MPI.COMM_WORLD)          # or load only this rank's rows
    trainer = DataParallelTrainer(fastbp.MLP([784, 256, 256, 10], seed=0), comm=MPI.COMM_WORLD,
                                  loss="softmax_cross_entropy", lr=0.05, batch_size=128, seed=0)
    history = trainer.fit(X_local, y_local, epochs=10, verbose=True)   # history is global

Semantics (what the tests check)
--------------------------------
* The union of the data is the concatenation of the ranks' shards in rank order: rank r holds global rows
  ``offsets[r]:offsets[r+1]`` (``offsets`` is the cumulative sum of the shard sizes, gathered once per fit).
* Every rank draws the same seeded permutation of the GLOBAL row indices each epoch (the same draws as
  :class:`fastbp.Trainer`; with ``seed=None`` rank 0 picks one and broadcasts it). A global batch is a
  slice of that permutation; each rank takes the rows of the slice that it holds (0 or more: the count
  varies per rank and step), computes the gradient of (sum of their row losses) / (the loss divisor of
  the WHOLE global batch), and one in-place ``Allreduce(SUM)`` of the flat (P,) gradient buffer gives the
  global batch's gradient on every rank. Every rank then applies the same optimizer step, so parameters
  and optimizer state stay identical. Hence N ranks with batch B train exactly as one
  :class:`fastbp.Trainer` with batch B on the union, up to the order of floating-point summation.
* History (loss, val_loss, val_accuracy) and :meth:`DataParallelTrainer.evaluate` are reduced over all
  ranks: they are the values over the union. :meth:`predict` is local (each rank predicts its rows).
* Rank 0's initial parameters and optimizer state are broadcast at the start of every fit.
* Only rank 0 prints progress (``fit(..., verbose=True)``); write checkpoints with
  :meth:`DataParallelTrainer.on_root`, which runs a function on rank 0 and re-raises its error on all ranks.

Failure
-------
* The constructor is collective: it allgathers a fingerprint of the model and training settings and
  raises the same ``ValueError`` (naming the fields that differ) on every rank when they disagree.
* ``fit`` checks its inputs on every rank, then agrees: an error on one rank is raised on all of them.
* An exception inside the training loop on one rank (a callback, a failed kernel, Ctrl-C) prints the
  traceback and calls ``comm.Abort(1)``: the other ranks would otherwise wait forever in the Allreduce.
  Launch with ``python -m mpi4py`` so that errors in your own code outside fastbp abort too.

Cost
----
Per optimizer step: one Allreduce of P numbers (4 P bytes in float32), the only communication, plus one
8-byte Allreduce per epoch for the loss and one per epoch for stopping decisions. With ``device="cuda"``
the gradient goes through a host buffer: a device-to-host and a host-to-device copy of 4 P bytes per step
(about 2 x 4 P / 25 GB/s over PCIe 4 x16: 0.09 ms for W3's 269k parameters), and each epoch's permuted
shard is copied to the device once.
"""
from __future__ import annotations

import sys
import time
import traceback

import numpy as np

from ._validation import as_float_matrix, check_choice, check_float, check_int
from .kernels.pointwise import LOSSES as LOSS_CODES, loss_divisor
from .trainer import History, NonFiniteLossError, Trainer, _EarlyStopping

__all__ = ["DataParallelTrainer", "shard", "shard_bounds", "MismatchError"]


class MismatchError(ValueError):
    """The ranks of one job were given different models, settings or fit arguments."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fastbp.distributed needs mpi4py and an MPI library; install them with: "
                          "pip install 'fastbp[mpi]'") from error
    return MPI


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of ``n`` rows that rank ``rank`` of ``size`` holds.

    Blocks differ in length by at most one row; the first ``n % size`` ranks get the longer ones."""
    n, size, rank = int(n), int(size), int(rank)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(X, y, comm):
    """This rank's contiguous block of rows of X and y (views when they are numpy arrays).

    Use it when every rank can read the whole data (``np.load(..., mmap_mode="r")`` reads only the block).
    """
    start, stop = shard_bounds(len(X), comm.Get_size(), comm.Get_rank())
    return X[start:stop], y[start:stop]


class DataParallelTrainer(Trainer):
    """A :class:`fastbp.Trainer` whose ``fit`` averages each global batch's gradient over MPI ranks.

    Takes every argument of :class:`fastbp.Trainer` (the same on every rank) plus ``comm``, an mpi4py
    intracommunicator. Construction is collective. See the module docstring for the exact semantics.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The ranks that train together (``MPI.COMM_WORLD``); a single-rank communicator trains alone.
    on_error : {"abort", "raise"}
        What an exception inside the training loop does: ``"abort"`` (default) ends the whole job with
        ``comm.Abort(1)`` after printing the traceback; ``"raise"`` only raises it on this rank (the
        other ranks then hang unless you abort them yourself).

    Attributes
    ----------
    timings : dict of lists
        Per completed epoch on this rank: ``epoch_seconds``, ``allreduce_seconds`` (time inside the gradient
        Allreduce, which includes waiting for slower ranks) and ``steps``.

    Notes
    -----
    ``fit`` and ``evaluate`` are collective and global; ``predict`` and ``loss_and_grads`` are the
    inherited, local ones (this rank's rows). Where :class:`fastbp.Trainer` runs many epochs inside one
    compiled call, this trainer returns to Python once per step (to call the Allreduce): a few Python
    calls per step, within measurement noise of the compiled loop on W3 (see the README).
    """

    def __init__(self, model, loss: str = "mse", optimizer: str = "sgd", lr=0.01, *, comm, on_error="abort",
                 **kwargs):
        if comm is None or not hasattr(comm, "Allreduce"):
            raise TypeError(f"comm must be an mpi4py communicator (MPI.COMM_WORLD); got {comm!r}")
        self.on_error = check_choice("on_error", on_error, ("abort", "raise"))
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        # Construct locally, then agree: an error on one rank must be raised on every rank.
        error = None
        try:
            super().__init__(model, loss, optimizer, lr, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "constructing the DataParallelTrainer")
        if self.seed is None:  # every rank must draw the same sample orders
            seed = comm.bcast(int(np.random.SeedSequence().entropy % (1 << 63)) if self.rank == 0 else None, root=0)
            self._rng = np.random.default_rng(seed)
        self._check_same("model and training settings", self.fingerprint())
        P = model.n_params
        self._grads_host = np.zeros(P, dtype=model.dtype)  # the one buffer the Allreduce works on, in place
        self._grads = self._backend.as_input(self._grads_host)  # the backend's (device) gradient buffer
        # Per completed epoch on this rank: wall time, time inside the gradient Allreduce (which includes
        # waiting for slower ranks), optimizer steps.
        self.timings = {"epoch_seconds": [], "allreduce_seconds": [], "steps": []}

    # -- agreement between ranks --------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def fingerprint(self) -> dict:
        """What must be equal on every rank: architecture, dtype, loss, optimizer and hyper-parameters."""
        lr = self.lr if isinstance(self.lr, (int, float, np.floating, np.integer)) else repr(type(self.lr).__name__)
        return dict(sizes=list(self.model.sizes), activations=list(self.model.activations),
                    dtype=self.model.dtype.name, n_params=int(self.model.n_params), loss=self.loss,
                    optimizer=self.optimizer, lr=lr, momentum=self.momentum, dampening=self.dampening,
                    nesterov=self.nesterov, weight_decay=self.weight_decay, betas=tuple(self.betas), eps=self.eps,
                    batch_size=self.batch_size, seed=self.seed, epochs_done=self.epochs_done,
                    steps_done=self.steps_done)

    def _check_same(self, what: str, values: dict) -> None:
        everyone = self.comm.allgather(values)
        differ = sorted({key for other in everyone for key in values if other.get(key) != values[key]})
        if differ:
            detail = "; ".join(f"{key}: " + ", ".join(f"rank {r}={v.get(key)!r}" for r, v in enumerate(everyone))
                               for key in differ)
            raise MismatchError(f"the {self.size} ranks disagree on the {what} ({detail})")

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank if any rank failed (the failing rank re-raises its own error)."""
        messages = self.comm.allgather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            r, message = failed[0]
            raise RuntimeError(f"rank {r} failed while {what}: {message}")

    def _allreduce_sum(self, values) -> np.ndarray:
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().SUM)
        return buf

    def _abort(self) -> None:
        traceback.print_exc()
        print(f"fastbp.distributed: rank {self.rank} failed inside the training loop; aborting all "
              f"{self.size} ranks", file=sys.stderr, flush=True)
        sys.stderr.flush()
        self.comm.Abort(1)

    def on_root(self, function, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` on rank 0 only (a checkpoint write); collective.

        Returns its result on rank 0 and None elsewhere; an error on rank 0 is raised on every rank."""
        result, error = None, None
        if self.is_root:
            try:
                result = function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        self._agree(error, f"running {getattr(function, '__name__', 'a function')} on rank 0")
        return result

    # -- training -----------------------------------------------------------------------------------------
    def _broadcast_state(self, params) -> None:
        """Rank 0's parameters and optimizer state become everyone's (the model's arrays are updated)."""
        self.comm.Bcast(params, root=0)
        self.comm.Bcast(self.opt_state, root=0)
        self.model.set_flat_parameters(params)

    def fit(self, X, y, epochs: int = 1, *, validation_data=None, target_loss: float | None = None,
            patience: int | None = None, restore_best: bool = True, callbacks=(), on_nonfinite: str = "raise",
            verbose: bool = False):
        """Train on this rank's shard ``X, y`` (collective; the same arguments on every rank).

        As :meth:`fastbp.Trainer.fit`, with the data and ``validation_data`` given as this rank's shards,
        and ``verbose`` printing each epoch's global loss on rank 0. Returns the global :class:`History`.
        """
        # 1. Check everything locally, then agree, so that a bad argument on one rank fails every rank.
        error = None
        try:
            epochs = check_int("epochs", epochs, minimum=0)
            target = check_float("target_loss", target_loss, allow_none=True)
            patience = check_int("patience", patience, minimum=1, allow_none=True)
            check_choice("on_nonfinite", on_nonfinite, ("raise", "warn"))
            if patience is not None and validation_data is None:
                raise ValueError("patience (early stopping) needs validation_data=(X_val, y_val)")
            callbacks = list(callbacks) if callbacks else []
            for i, cb in enumerate(callbacks):
                if not callable(cb):
                    raise TypeError(f"callbacks[{i}] must be callable; got {type(cb).__name__}")
            Xh, Yh = self._host_data(X, y)
            if Xh.shape[0] == 0:
                raise ValueError("this rank's shard of X is empty: give every rank at least one row")
            validation = None
            if validation_data is not None:
                if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                    raise TypeError("validation_data must be a pair (X_val, y_val)")
                validation = self._data(*validation_data, prefix="validation_data ")
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "checking the arguments of fit")
        self._check_same("arguments of fit", dict(
            epochs=epochs, target_loss=target, patience=patience, restore_best=bool(restore_best),
            on_nonfinite=on_nonfinite, n_callbacks=len(callbacks), validation=validation is not None,
            fingerprint=self.fingerprint()))

        counts = np.array(self.comm.allgather(int(Xh.shape[0])), dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(counts)))
        lo, n_local, n = int(offsets[self.rank]), int(counts[self.rank]), int(offsets[-1])
        k = self.n_outputs
        batch_size = n if self.batch_size is None else min(self.batch_size, n)
        shuffle = batch_size < n  # as Trainer.fit: a full batch's gradient does not depend on the order
        batch_starts = np.arange(0, n, batch_size, dtype=np.int64)
        divisors = [float(loss_divisor(LOSS_CODES[self.loss], int(min(batch_size, n - s)), k))
                    for s in batch_starts]
        epoch_divisor = float(loss_divisor(LOSS_CODES[self.loss], n, k))
        # Buffers for one epoch's permuted shard (host, reused every epoch).
        X_epoch, Y_epoch = (np.empty_like(Xh), np.empty_like(Yh)) if shuffle else (Xh, Yh)
        local_pos = np.empty(n_local, dtype=np.int64)

        history = History()
        early = _EarlyStopping(self, patience) if patience is not None else None
        params = self._begin()
        self._broadcast_state(params)
        self._backend.load_state(params, self.opt_state, self.steps_done)
        backup = np.empty_like(params), np.empty_like(self.opt_state)
        try:
            for _ in range(epochs):
                epoch = self.epochs_done
                lr = self._lr_at(epoch)
                started = time.perf_counter()
                # This rank's rows in the order the global permutation visits them, and where each global
                # batch's share starts in that order (row_starts[b]:row_starts[b+1]).
                if shuffle:
                    order = self._rng.permutation(n)
                    local = order - lo
                    mine = np.flatnonzero((local >= 0) & (local < n_local))
                    local_pos[:] = local[mine]
                    row_starts = np.searchsorted(mine, np.append(batch_starts, n))
                    np.take(Xh, local_pos, axis=0, out=X_epoch)
                    np.take(Yh, local_pos, axis=0, out=Y_epoch)
                else:
                    row_starts = np.clip(np.append(batch_starts, n) - lo, 0, n_local)
                Xd, Yd = self._backend.as_input(X_epoch), self._backend.as_input(Y_epoch)
                steps0 = self._backend.store_state(backup[0], backup[1])
                total = 0.0
                comm_seconds = 0.0
                for b, divisor in enumerate(divisors):
                    a, z = int(row_starts[b]), int(row_starts[b + 1])
                    part = self._backend.rows_grads(Xd[a:z], Yd[a:z], divisor, self._grads)
                    total += part * divisor  # the sum of this rank's row losses in this batch
                    tick = time.perf_counter()
                    self._allreduce_grads()
                    comm_seconds += time.perf_counter() - tick
                    self._backend.apply_update(self._grads, lr)
                epoch_loss = float(self._allreduce_sum([total])[0]) / epoch_divisor
                seconds = time.perf_counter() - started
                if not np.isfinite(epoch_loss):  # the same on every rank: restore the epoch's start
                    params[...] = backup[0]
                    self.opt_state[...] = backup[1]
                    self._backend.load_state(params, self.opt_state, steps0)
                    history.stop_reason = "nonfinite"
                    self._nonfinite(epoch, epoch_loss, lr, on_nonfinite)
                    break
                self._record(history, epoch, epoch_loss, lr, seconds)
                self.timings["epoch_seconds"].append(seconds)
                self.timings["allreduce_seconds"].append(comm_seconds)
                self.timings["steps"].append(len(divisors))
                self.epochs_done += 1
                if verbose and self.is_root:
                    print(f"epoch {epoch}: loss {epoch_loss:.6g} ({seconds:.3f} s, {self.size} ranks)", flush=True)
                if target is not None and epoch_loss <= target:
                    history.stop_reason = "target_loss"
                    break
                if validation is not None:
                    val = self._reduced_scores(*validation)
                    for h in (history, self.history):
                        h.val_loss.append(val["loss"])
                        if "accuracy" in val:
                            h.val_accuracy.append(val["accuracy"])
                    if early is not None and early.should_stop(val["loss"], params):
                        history.stop_reason = "early_stopping"
                        break
                if callbacks:
                    stop = any(bool(cb(self, history)) for cb in callbacks)
                    if self._allreduce_sum([float(stop)])[0] > 0:  # one rank's stop stops everyone
                        history.stop_reason = "callback"
                        break
        except NonFiniteLossError:
            raise  # decided from the reduced loss: every rank raises it together
        except BaseException:
            if self.on_error == "abort" and self.size > 1:
                self._abort()
            raise
        finally:
            self._end(params)
        if history.stop_reason == "early_stopping" and restore_best:
            early.restore()
        return history

    def _host_data(self, X, y):
        """X, Y as host arrays in the kernels' form (one-hot rows for class ids)."""
        Xh = as_float_matrix("X", X, self.model.dtype, n_columns=self.model.sizes[0])
        Yh = self._targets(y, Xh.shape[0])
        if not isinstance(Yh, np.ndarray):  # a device array from a GPU backend's as_input
            Yh = Yh.copy_to_host()
        return (np.ascontiguousarray(Xh, dtype=self.model.dtype), np.ascontiguousarray(Yh, dtype=self.model.dtype))

    def _allreduce_grads(self) -> None:
        """Sum the flat gradient over ranks, in place; through the host buffer when it lives on a device."""
        MPI = _mpi()
        if self._grads is self._grads_host:
            self.comm.Allreduce(MPI.IN_PLACE, self._grads_host, op=MPI.SUM)
        else:  # a device buffer (numba-cuda DeviceNDArray): 2 PCIe copies of 4 P bytes per step
            self._grads.copy_to_host(self._grads_host)
            self.comm.Allreduce(MPI.IN_PLACE, self._grads_host, op=MPI.SUM)
            self._grads.copy_to_device(self._grads_host)

    def _reduced_scores(self, Xc, Yc) -> dict:
        """Loss (and accuracy) over the union of the ranks' shards Xc, Yc (backend inputs)."""
        n_local = Xc.shape[0]
        k = self.n_outputs
        loss_sum = correct = 0.0
        if n_local:
            loss_sum = self._backend.loss_value(Xc, Yc) * float(loss_divisor(LOSS_CODES[self.loss], n_local, k))
            if self.loss != "mse":
                correct = self._accuracy(np.asarray(self._backend.predict(Xc, k)), np.asarray(Yc)) * n_local
        loss_sum, correct, n = self._allreduce_sum([loss_sum, correct, n_local])
        scores = {"loss": float(loss_sum / float(loss_divisor(LOSS_CODES[self.loss], int(n), k)))}
        if self.loss != "mse":
            scores["accuracy"] = float(correct / n)
        return scores

    def evaluate(self, X, y) -> dict:
        """``{"loss"}`` (and ``"accuracy"``) over the union of every rank's ``X, y`` shard; collective."""
        error = None
        try:
            Xc, Yc = self._data(X, y)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "checking the arguments of evaluate")
        params = self._begin()
        try:
            return self._reduced_scores(Xc, Yc)
        finally:
            self._end(params)

    def _clone(self, lr):
        raise NotImplementedError("choose_learning_rate is not distributed: run it in one process, or run one "
                                  "candidate per rank with fastbp.Trainer and a split communicator")

