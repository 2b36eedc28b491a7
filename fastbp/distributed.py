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

from ._validation import check_choice
from .trainer import NonFiniteLossError, Trainer

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

    steps_need_python = True  # the gradient Allreduce runs between each step's gradient and its update

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
        # Per completed epoch on this rank: wall time, time inside the gradient Allreduce (which includes
        # waiting for slower ranks), optimizer steps.
        self.timings = {"epoch_seconds": [], "allreduce_seconds": [], "steps": []}
        self._allreduce_seconds = 0.0

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
                    clip_grad_norm=self.clip_grad_norm, batch_size=self.batch_size, seed=self.seed,
                    epochs_done=self.epochs_done,
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

    # -- training: Trainer.fit's loop, with the step hook filled in ---------------------------------------------
    def fit(self, X, y, epochs: int = 1, *, validation_data=None, target_loss: float | None = None,
            patience: int | None = None, restore_best: bool = True, callbacks=(), on_nonfinite: str = "raise",
            verbose: bool | int = False, sample_weight=None):
        """Train on this rank's shard ``X, y`` (collective; the same arguments on every rank).

        As :meth:`fastbp.Trainer.fit`, with the data, ``validation_data`` and ``sample_weight`` given as this
        rank's shards, and ``verbose`` showing progress on rank 0 only. Returns the global :class:`History`.
        With sample weights, a global batch's loss is its weighted mean over every rank's rows in it (its
        divisor is their weight sum over every rank); one rank's shard may weigh nothing, not every rank's.
        """
        # 1. Check everything locally, then agree, so that a bad argument on one rank fails every rank.
        plan, error = None, None
        try:
            plan = self._plan_fit(X, y, epochs, validation_data, target_loss, patience, restore_best, callbacks,
                                  on_nonfinite, verbose, sample_weight)
            if plan.X.shape[0] == 0:
                raise ValueError("this rank's shard of X is empty: give every rank at least one row")
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "checking the arguments of fit")
        self._check_weights(plan.sample_weight, plan.X.shape[0])
        self._check_same("arguments of fit", dict(
            epochs=plan.epochs, target_loss=plan.target, patience=plan.patience, restore_best=plan.restore_best,
            on_nonfinite=plan.on_nonfinite, n_callbacks=len(plan.callbacks), validation=plan.validation is not None,
            fingerprint=self.fingerprint()))
        # 2. Train; an error on one rank ends the job (the others would wait in the Allreduce forever).
        try:
            self._broadcast_state()
            return self._run_fit(plan)
        except NonFiniteLossError:
            raise  # decided from the reduced loss: every rank raises it together
        except BaseException:
            if self.on_error == "abort" and self.size > 1:
                self._abort()
            raise

    def _broadcast_state(self) -> None:
        """Rank 0's parameters and optimizer state become everyone's (the model's arrays are updated)."""
        self.comm.Bcast(self.model._training_vector(), root=0)
        self.model._after_training()
        opt_state = np.ascontiguousarray(self.opt_state)
        self.comm.Bcast(opt_state, root=0)
        self._backend.set_optimizer_state(opt_state)

    def _rows_per_epoch(self, n_local: int) -> int:
        counts = np.array(self.comm.allgather(int(n_local)), dtype=np.int64)
        self._first_row = int(counts[:self.rank].sum())  # this shard's first row in the union
        return int(counts.sum())

    def _local_batches(self, order, n_local: int, batch_starts: np.ndarray, n: int):
        """This rank's rows in the order the global permutation visits them, and where each global batch's share
        starts in that order (rank r holds global rows first_row:first_row + n_local)."""
        if order is None:  # in order (one full batch): this rank's rows of each global batch, as they are
            return None, np.clip(np.append(batch_starts, n) - self._first_row, 0, n_local)
        local = order - self._first_row
        mine = np.flatnonzero((local >= 0) & (local < n_local))
        return local[mine], np.searchsorted(mine, np.append(batch_starts, n))

    def _reduce_gradient(self, grads: np.ndarray) -> None:
        """Sum the flat gradient over ranks, in place: one Allreduce of P numbers."""
        MPI = _mpi()
        tick = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        self._allreduce_seconds += time.perf_counter() - tick

    def _reduce_sum(self, values) -> np.ndarray:
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(_mpi().IN_PLACE, buf, op=_mpi().SUM)
        return buf

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._reduce_sum([float(flag)])[0] > 0)  # one rank's stop stops everyone

    def _prints(self) -> bool:
        return self.is_root

    def _epoch_done(self, seconds: float, steps: int) -> None:
        self.timings["epoch_seconds"].append(seconds)
        self.timings["allreduce_seconds"].append(self._allreduce_seconds)
        self.timings["steps"].append(steps)
        self._allreduce_seconds = 0.0

    def _global_scores(self, loss: float, divisor: float, correct: float, terms: float) -> dict:
        """Loss (and accuracy) over the union of the ranks' rows, from this rank's (weighted) mean loss and
        divisor, right accuracy terms and their count."""
        loss_sum, divisor, correct, terms = self._reduce_sum([loss * divisor, divisor, correct, terms])
        return super()._global_scores(loss_sum / divisor, divisor, correct, terms)

    # One rank's shard may weigh nothing; the sum over every rank is checked collectively (_check_weights).
    _local_weights_may_all_be_zero = True

    def _check_weights(self, weights, n_local: int) -> None:
        """Collective: refuse sample weights that are 0 on every rank (the weighted mean would be 0 / 0)."""
        local = n_local if weights is None else float(weights.sum(dtype=np.float64))
        if self._reduce_sum([local])[0] == 0.0:
            raise ValueError("sample_weight must not be all zero over every rank's rows (the weighted mean loss "
                             "would be 0 / 0)")

    def evaluate(self, X, y, sample_weight=None) -> dict:
        """``{"loss"}`` (and ``"accuracy"``) over the union of every rank's ``X, y`` shard; collective. With
        ``sample_weight`` (this rank's rows,), weighted means over the union as :meth:`fastbp.Trainer.evaluate`."""
        error = weights = None
        try:
            Xc, Yc = self._data(X, y)
            weights = self._sample_weight(sample_weight, Xc.shape[0])
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "checking the arguments of evaluate")
        self._check_weights(weights, Xc.shape[0])
        self._use_model_parameters(finite=False)
        return self._scores(Xc, Yc, weights)

    def _clone(self, lr):
        raise NotImplementedError("choose_learning_rate is not distributed: run it in one process, or run one "
                                  "candidate per rank with fastbp.Trainer and a split communicator")
