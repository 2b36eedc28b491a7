"""Data-parallel training over MPI (mpi4py): one process per core, machine or GPU.

Run a script under ``mpiexec -n 4 python -m mpi4py train.py``; in it::

    from mpi4py import MPI
    import fastbp
    from fastbp.distributed import DataParallelTrainer, shard

    X_local, y_local = shard(X, y, MPI.COMM_WORLD)          # or load only this rank's rows
    trainer = DataParallelTrainer(fastbp.MLP([784, 256, 256, 10], seed=0), comm=MPI.COMM_WORLD,
                                  loss="softmax_cross_entropy", lr=0.05, batch_size=128, seed=0)
    history = trainer.fit(X_local, y_local, epochs=10, verbose=True,       # history is global
                          checkpoint_every=1, checkpoint_path="run.npz")   # rank 0 saves, atomically

    # after a crash, on any number of ranks (the same data, sharded for the new count):
    trainer = DataParallelTrainer.load("run.npz", comm=MPI.COMM_WORLD)
    trainer.fit(X_local, y_local, epochs=10 - trainer.epochs_done, checkpoint_every=1, checkpoint_path="run.npz")

docs/scale-out.md has the recipes (mpiexec with a hostfile, SLURM's srun and sbatch).

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
  :class:`fastbp.Trainer` with batch B on the union, up to the order of floating-point summation: float64
  agrees to about 1e-10 relative, float32 to its rounding, a difference that grows with the steps.
* History (loss, val_loss, val_accuracy) and :meth:`DataParallelTrainer.evaluate` are reduced over all
  ranks: they are the values over the union. :meth:`predict` is local (each rank predicts its rows).
* Rank 0's initial parameters and optimizer state are broadcast at the start of every fit.
* Only rank 0 prints progress (``fit(..., verbose=True)``).

Checkpoints and resuming
------------------------
The training state is global (parameters, optimizer state, step and epoch counters, the shuffling RNG, the
history are the same on every rank), so a checkpoint is one ordinary :meth:`fastbp.Trainer.save` file
written by rank 0: ``fit(..., checkpoint_every=N, checkpoint_path=path)`` writes it after every N-th epoch
(counted across fits) and at the end of the fit, atomically (a crash mid-write leaves the previous file).
:meth:`DataParallelTrainer.load` (collective) reads it on rank 0 and broadcasts it, so the file need only
be visible to rank 0. A resumed run continues exactly where the saved one stopped, on any number of ranks
provided the union of the shards is the same rows in the same order: on the same number of ranks the
weights equal an uninterrupted run's bit for bit; on another number they differ only by summation order.
``fastbp.Trainer.load(path)`` reads the same file in one process.

Failure
-------
* The constructor is collective: it allgathers a fingerprint of the model and training settings and
  raises the same ``ValueError`` (naming the fields that differ) on every rank when they disagree.
* ``fit`` checks its inputs on every rank, then agrees: an error on one rank is raised on all of them.
* An exception inside the training loop on one rank (a callback, a failed kernel, Ctrl-C) prints the
  traceback and calls ``comm.Abort(1)``: the other ranks would otherwise wait forever in the Allreduce.
  Launch with ``python -m mpi4py`` so that errors in your own code outside fastbp abort too.
* A rank that stops answering (stopped, hung in I/O or a driver, its node frozen) is caught: every
  collective operation of the trainer waits at most ``collective_timeout`` seconds (default 600). Then each
  waiting rank tells the others, waits ``NOTICE_GRACE_SECONDS`` for their word, and raises
  :class:`CollectiveTimeoutError` naming the ranks that did not answer; with ``on_error="abort"`` it prints
  that error and aborts the job. A killed rank needs none of this: the MPI launcher ends the job at once.

How the timeout waits
---------------------
MPI's blocking collectives cannot time out, so each collective is started nonblocking (``Iallreduce``,
``Ibcast``; ``Ibarrier`` before a pickled ``allgather`` / ``bcast``) and polled: ``Test`` in a tight loop
for ``SPIN_SECONDS`` (a normal step's wait for the slowest rank is shorter, and MPI progresses the transfer
only while polled), then in bursts of ``BURST_SECONDS`` separated by sleeps of 1/20 of the wait so far (at
most ``SLEEP_SECONDS``): a rank waiting for a slow one leaves its core to the others, and is back within
5% of the wait. Every poll calls ``sched_yield``: without it, where ranks share cores (with each other or
with other jobs) the polling rank held the core that the rank it waited for needed, and W3 steps on 2 ranks
of a busy 2-core machine took 40% longer than with MPI's blocking Allreduce (MPICH's busy-wait loop yields
the core every MPIR_CVAR_POLLS_BEFORE_YIELD polls); with it the two are equal (docs/scale-out.md).

Cost
----
Per optimizer step: one Allreduce of P numbers (4 P bytes in float32), the only communication, plus one
8-byte Allreduce per epoch for the loss and one per epoch for stopping decisions. With ``device="cuda"``
the gradient goes through a host buffer: a device-to-host and a host-to-device copy of 4 P bytes per step
(about 2 x 4 P / 25 GB/s over PCIe 4 x16: 0.09 ms for W3's 269k parameters), and each epoch's permuted
shard is copied to the device once.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

from . import backends, checkpoint
from ._validation import check_choice, check_float, check_int
from .trainer import NonFiniteLossError, Trainer

__all__ = ["DataParallelTrainer", "shard", "shard_bounds", "MismatchError", "CollectiveTimeoutError",
           "DEFAULT_COLLECTIVE_TIMEOUT"]

# How long a rank waits in one collective operation before it declares the ranks that have not arrived hung:
# generous, because the wait includes the other ranks' work since the previous collective. The longest
# legitimate gap is a rank compiling the kernels on a cold cache at its first fit (45 s on the project's 2-core
# machine, 42-69 s in issue 30; docs/scale-out.md) while the others load theirs, or rank 0 writing a
# checkpoint to slow storage.
DEFAULT_COLLECTIVE_TIMEOUT = 600.0
# Polling (see "How the timeout waits" above). A W3 step's wait for the slower of 2 ranks is about 0.1-2 ms.
SPIN_SECONDS = 0.01
BURST_SECONDS = 0.001
SLEEP_SECONDS = 0.01
# After a timeout: how long a rank listens for the other ranks' notices. Every rank that is waiting in the
# same collective answers within one sleep (SLEEP_SECONDS); the rest have not arrived and are named.
NOTICE_GRACE_SECONDS = 2.0
# Before comm.Abort: time for the other waiting ranks to print their own report (they time out together).
ABORT_PAUSE_SECONDS = 1.0
# Before comm.Abort after a failure: time for the launcher to forward this rank's report (see report_and_abort).
REPORT_PAUSE_SECONDS = 0.3
# The point-to-point tag of the timeout notices (MPI guarantees tags up to 32767).
NOTICE_TAG = 30_030


class MismatchError(ValueError):
    """The ranks of one job were given different models, settings or fit arguments."""


class CollectiveTimeoutError(RuntimeError):
    """Some ranks did not reach a collective operation within ``collective_timeout`` seconds.

    Attributes
    ----------
    missing_ranks : tuple of int
        The ranks that neither arrived nor answered the notice (stopped, hung, or busy for longer than the
        timeout); empty when every rank answered but they wait in different collective operations.
    operation : str
        What this rank was waiting in (e.g. "the gradient Allreduce of optimizer step 1234").
    timeout : float
        The ``collective_timeout`` in force.

    The communicator cannot be used again after it (a collective operation is left unfinished): end the job.
    """

    def __init__(self, message: str, missing_ranks=(), operation: str = "", timeout: float = 0.0):
        super().__init__(message)
        self.missing_ranks = tuple(missing_ranks)
        self.operation = operation
        self.timeout = timeout


_yield_core = getattr(os, "sched_yield", lambda: None)  # Unix; elsewhere no yielding


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fastbp.distributed needs mpi4py and an MPI library; install them with: "
                          "pip install 'fastbp[mpi]'") from error
    return MPI


def check_collective_timeout(value):
    """``collective_timeout``: seconds > 0, or None (wait forever, MPI's blocking behaviour)."""
    return check_float("collective_timeout", value, minimum=0.0, exclusive_minimum=True, allow_none=True)


def _rank_list(ranks) -> str:
    ranks = list(ranks)
    if not ranks:
        return "no rank"
    words = [str(r) for r in ranks]
    joined = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return ("rank " if len(ranks) == 1 else "ranks ") + joined


class _Collectives:
    """The collective operations of one trainer (or one load) on ``comm``, each with a deadline.

    Every operation here is collective over ``comm``: each rank must call the same ones in the same order."""

    def __init__(self, comm, timeout, on_error: str):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = timeout
        self.on_error = on_error
        self.count = 0  # collective operations started by this object: a rank's position in the sequence

    # -- the operations ----------------------------------------------------------------------------------------
    def allreduce_sum(self, buffer: np.ndarray, operation: str, detail=None) -> None:
        """Sum ``buffer`` over every rank, in place."""
        MPI = _mpi()
        self.wait(self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM), operation, detail)

    def broadcast_buffer(self, buffer: np.ndarray, operation: str) -> None:
        """Rank 0's ``buffer`` into everyone's, in place."""
        self.wait(self.comm.Ibcast(buffer, root=0), operation)

    def allgather(self, value, operation: str) -> list:
        """Every rank's (picklable) ``value``, in rank order. mpi4py has no nonblocking pickled allgather: a
        timed barrier first, so that the blocking call starts only once every rank is there."""
        self.wait(self.comm.Ibarrier(), operation)
        return self.comm.allgather(value)

    def broadcast(self, value, operation: str):
        """Rank 0's (picklable) ``value`` on every rank (timed like :meth:`allgather`)."""
        self.wait(self.comm.Ibarrier(), operation)
        return self.comm.bcast(value, root=0)

    # -- waiting with a deadline -------------------------------------------------------------------------------
    def wait(self, request, operation: str, detail=None) -> None:
        """Until ``request`` completes, or raise :class:`CollectiveTimeoutError` after ``self.timeout`` seconds.

        ``detail`` (optional) is appended to ``operation`` in the error: it is formatted only then."""
        self.count += 1
        if request.Test():
            return
        if self.timeout is None:
            request.Wait()
            return
        clock = time.perf_counter
        started = now = clock()
        # Tight polling first: a step's normal wait, and the transfer itself (MPI moves data only while polled).
        # Each poll offers the core to another process (sched_yield returns at once when none wants it): where
        # ranks share cores with each other or with other jobs, the rank being waited for gets to run.
        until = started + SPIN_SECONDS
        while now < until:
            if request.Test():
                return
            _yield_core()
            now = clock()
        deadline = started + self.timeout
        MPI = _mpi()
        while True:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=NOTICE_TAG):  # another rank has timed out
                self._timed_out(operation, detail, now - started, noticed=True)
            if now >= deadline:
                self._timed_out(operation, detail, now - started, noticed=False)
            time.sleep(min(SLEEP_SECONDS, (now - started) / 20))
            until = clock() + BURST_SECONDS
            while True:
                if request.Test():
                    return
                _yield_core()
                now = clock()
                if now >= until:
                    break

    def _timed_out(self, operation: str, detail, waited: float, noticed: bool):
        """Tell every other rank that this one gives up, hear which ranks are waiting too, then raise (or, with
        on_error="abort", report and abort the job). Never returns."""
        MPI = _mpi()
        comm, clock = self.comm, time.perf_counter
        what = operation if detail is None else f"{operation} {detail}"
        mine = np.array([self.rank, self.count], dtype=np.int64)
        sends = [comm.Isend(mine, dest=r, tag=NOTICE_TAG) for r in range(self.size) if r != self.rank]
        heard = {self.rank: self.count}  # rank -> its position in the sequence of collectives
        inbox, status = np.empty(2, dtype=np.int64), MPI.Status()
        until = clock() + NOTICE_GRACE_SECONDS
        while len(heard) < self.size and clock() < until:
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=NOTICE_TAG, status=status):
                comm.Recv(inbox, source=status.Get_source(), tag=NOTICE_TAG)
                heard[int(inbox[0])] = int(inbox[1])
            else:
                time.sleep(0.001)
        del sends  # left unfinished on purpose: a stopped rank never receives its notice
        missing = [r for r in range(self.size) if r not in heard]
        waiting = sorted(heard)
        how = (f"this rank waited {waited:.1f} s" if not noticed else
               f"this rank had waited {waited:.1f} s when another rank's {self.timeout:g} s ran out")
        if missing:
            message = (f"{_rank_list(missing)} did not reach {what} within collective_timeout="
                       f"{self.timeout:g} s and did not answer: stopped, hung, or busy for longer than the timeout "
                       f"({_rank_list(waiting)} waited there; {how}). Raise collective_timeout if a rank can "
                       "legitimately be busy that long between two collective operations (a cold compile, a "
                       "long callback).")
        else:
            positions = ", ".join(f"rank {r} at #{heard[r]}" for r in waiting)
            message = (f"{what} did not complete within collective_timeout={self.timeout:g} s although every "
                       f"rank answered: the ranks are in different collective operations ({positions}); every "
                       "rank must make the same fastbp.distributed calls in the same order.")
        error = CollectiveTimeoutError(message, missing, what, self.timeout)
        if self.on_error == "abort" and self.size > 1:
            report_and_abort(comm, self.rank, self.size, error)
        raise error


def report_and_abort(comm, rank: int, size: int, error: BaseException | None = None) -> None:
    """Print why (``error``'s message for a timeout, else the current exception's traceback) and end every rank
    of the job with ``comm.Abort(1)``."""
    timed_out = isinstance(error, CollectiveTimeoutError)
    if timed_out:
        report = f"fastbp.distributed: rank {rank}: CollectiveTimeoutError: {error}\n"
    else:
        report = traceback.format_exc()
    where = "gave up waiting for the other ranks" if timed_out else "failed inside the training loop"
    report += f"fastbp.distributed: rank {rank} {where}; aborting all {size} ranks\n"
    # One write, then a pause: MPICH's launcher forwards a rank's output from a pipe and stops reading it once
    # the abort has reached it, so the last lines written just before comm.Abort were lost in 2 of 12 runs
    # (mpich 5.0.2, 2 ranks; CI failed on it once). The pause lets it forward the report first.
    sys.stdout.flush()
    sys.stderr.flush()
    _write_all(2, report.encode("utf-8", "replace"))
    time.sleep(ABORT_PAUSE_SECONDS if timed_out else REPORT_PAUSE_SECONDS)
    comm.Abort(1)
    # MPICH's MPI_Abort returns once it has asked the launcher to end the job (measured with mpich 5.0.2: the
    # caller went on for about 0.2 s, long enough to run the caller's error handling and print more).
    os._exit(1)


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a pipe takes at most its free space per call)."""
    while data:
        data = data[os.write(fd, data):]


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


def _check_comm(comm):
    if comm is None or not hasattr(comm, "Iallreduce"):
        raise TypeError(f"comm must be an mpi4py communicator (MPI.COMM_WORLD); got {comm!r}")
    return comm


class DataParallelTrainer(Trainer):
    """A :class:`fastbp.Trainer` whose ``fit`` averages each global batch's gradient over MPI ranks.

    Takes every argument of :class:`fastbp.Trainer` (the same on every rank) plus ``comm``, an mpi4py
    intracommunicator. Construction is collective. See the module docstring for the exact semantics.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The ranks that train together (``MPI.COMM_WORLD``); a single-rank communicator trains alone.
    on_error : {"abort", "raise"}
        What an exception inside the training loop, or a collective timeout anywhere, does: ``"abort"``
        (default) prints the traceback (or the timeout's report) and ends the whole job with
        ``comm.Abort(1)``; ``"raise"`` only raises it on this rank (after an exception on one rank the other
        ranks then wait until their collective timeout; after a timeout the communicator is unusable).
    collective_timeout : float or None
        Seconds a rank waits in one collective operation (a step's gradient Allreduce, an epoch's loss, the
        agreement at the start of fit) for the other ranks, default ``DEFAULT_COLLECTIVE_TIMEOUT`` (600). The
        wait includes the other ranks' work since the previous collective, so it must exceed the longest
        legitimate gap: a cold compile of the kernels on the first fit (about a minute), a long callback,
        a checkpoint written to slow storage. Then :class:`CollectiveTimeoutError` names the ranks that did
        not answer. ``None``: wait forever (MPI's blocking collectives). Can be changed later.

    Attributes
    ----------
    timings : dict of lists
        Per completed epoch on this rank: ``epoch_seconds``, ``allreduce_seconds`` (time inside the gradient
        Allreduce, which includes waiting for slower ranks) and ``steps``.

    Notes
    -----
    ``fit``, ``evaluate``, ``on_root``, :meth:`load` and :meth:`from_state_dict` are collective and global;
    ``predict`` and ``loss_and_grads`` are the inherited, local ones (this rank's rows), and so is ``save``
    (every rank holds the same state: call it through :meth:`on_root`, or let ``fit`` checkpoint). Where
    :class:`fastbp.Trainer` runs many epochs inside one compiled call, this trainer returns to Python once per
    step (to call the Allreduce): a few Python calls per step, within measurement noise of the compiled loop
    on W3 (docs/scale-out.md).
    """

    steps_need_python = True  # the gradient Allreduce runs between each step's gradient and its update

    def __init__(self, model, loss: str = "mse", optimizer: str = "sgd", lr=0.01, *, comm, on_error="abort",
                 collective_timeout=DEFAULT_COLLECTIVE_TIMEOUT, **kwargs):
        _check_comm(comm)
        self.on_error = check_choice("on_error", on_error, ("abort", "raise"))
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._coll = _Collectives(comm, check_collective_timeout(collective_timeout), self.on_error)
        # Construct locally, then agree: an error on one rank must be raised on every rank.
        error = None
        try:
            super().__init__(model, loss, optimizer, lr, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "constructing the DataParallelTrainer")
        if self.seed is None:  # every rank must draw the same sample orders
            seed = self._coll.broadcast(int(np.random.SeedSequence().entropy % (1 << 63)) if self.rank == 0
                                        else None, "broadcasting rank 0's seed")
            self._rng = np.random.default_rng(seed)
        self._check_same("model and training settings", self.fingerprint())
        # Per completed epoch on this rank: wall time, time inside the gradient Allreduce (which includes
        # waiting for slower ranks), optimizer steps.
        self.timings = {"epoch_seconds": [], "allreduce_seconds": [], "steps": []}
        self._allreduce_seconds = 0.0
        self._step_base = self._reductions = 0  # for naming the step of a gradient Allreduce that times out

    @property
    def collective_timeout(self) -> float | None:
        return self._coll.timeout

    @collective_timeout.setter
    def collective_timeout(self, value) -> None:
        self._coll.timeout = check_collective_timeout(value)

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
        everyone = self._coll.allgather(values, f"comparing the {what}")
        differ = sorted({key for other in everyone for key in values if other.get(key) != values[key]})
        if differ:
            detail = "; ".join(f"{key}: " + ", ".join(f"rank {r}={v.get(key)!r}" for r, v in enumerate(everyone))
                               for key in differ)
            raise MismatchError(f"the {self.size} ranks disagree on the {what} ({detail})")

    def _agree(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank if any rank failed (the failing rank re-raises its own error)."""
        messages = self._coll.allgather(None if error is None else f"{type(error).__name__}: {error}",
                                        f"the agreement after {what}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            r, message = failed[0]
            raise RuntimeError(f"rank {r} failed while {what}: {message}")

    def _abort(self) -> None:
        report_and_abort(self.comm, self.rank, self.size)

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

    # -- checkpoints and resuming ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, *, comm, lr=None, device: str | None = None, on_error: str = "abort",
             collective_timeout=DEFAULT_COLLECTIVE_TIMEOUT) -> "DataParallelTrainer":
        """Read a trainer checkpoint (:meth:`fastbp.Trainer.save`, or ``fit(checkpoint_path=...)``) on every
        rank of ``comm``; collective.

        Rank 0 reads ``path`` and broadcasts its content (only rank 0 needs to see the file; the others'
        ``path`` is not used). Any number of ranks may resume a run saved by any number of ranks (or by one
        :class:`fastbp.Trainer`): give them shards whose union is the saved run's rows in the same order. An
        error (no file, a damaged one, a model-only checkpoint) is raised on every rank, as the same exception.

        Parameters
        ----------
        comm : mpi4py.MPI.Comm
        lr, device
            As in :meth:`fastbp.Trainer.load`: ``lr`` replaces the stored rate or schedule (required for a
            custom callable), ``device`` overrides the stored device.
        on_error, collective_timeout
            As in :class:`DataParallelTrainer` (they are not stored in the checkpoint).

        Examples
        --------
        Resuming a run for 20 epochs in all, checkpointing every epoch::

            trainer = DataParallelTrainer.load("run.npz", comm=comm)
            trainer.fit(X_local, y_local, epochs=20 - trainer.epochs_done, checkpoint_every=1,
                        checkpoint_path="run.npz")
        """
        options = cls._check_options(comm, lr, device, on_error, collective_timeout)
        coll = _Collectives(comm, options["collective_timeout"], options["on_error"])
        payload = None
        if coll.rank == 0:
            try:
                kind, state = checkpoint.read(path)
                if kind != "trainer":
                    raise checkpoint.CheckpointError(f"{checkpoint._as_path(path)!r} holds a model, not a trainer; "
                                                     "read it with fastbp.MLP.load")
                payload = (None, state)
            except Exception as error:  # noqa: BLE001 - raised below, on every rank
                payload = (error, None)
        error, state = coll.broadcast(payload, "broadcasting the checkpoint rank 0 read")
        if error is not None:
            raise error  # the same exception, on every rank
        with checkpoint.reported_as_checkpoint_error():
            return cls._from_state_on_every_rank(state, comm, options)

    @classmethod
    def from_state_dict(cls, state: dict | None, *, comm, lr=None, device: str | None = None,
                        on_error: str = "abort", collective_timeout=DEFAULT_COLLECTIVE_TIMEOUT
                        ) -> "DataParallelTrainer":
        """A new trainer on every rank of ``comm`` equal to the one whose :meth:`state_dict` ``state`` is (a
        :class:`fastbp.Trainer`'s or a :class:`DataParallelTrainer`'s); collective.

        Rank 0's ``state`` is broadcast and used on every rank; the others may pass None. ``lr``, ``device``,
        ``on_error`` and ``collective_timeout`` as in :meth:`load`."""
        options = cls._check_options(comm, lr, device, on_error, collective_timeout)
        coll = _Collectives(comm, options["collective_timeout"], options["on_error"])
        state = coll.broadcast(state if coll.rank == 0 else None, "broadcasting rank 0's state")
        return cls._from_state_on_every_rank(state, comm, options)

    @staticmethod
    def _check_options(comm, lr, device, on_error, collective_timeout) -> dict:
        _check_comm(comm)
        if lr is not None:
            Trainer._check_lr(lr)
        if device is not None:
            check_choice("device", device, backends.DEVICES)
        return dict(lr=lr, device=device, on_error=check_choice("on_error", on_error, ("abort", "raise")),
                    collective_timeout=check_collective_timeout(collective_timeout))

    @classmethod
    def _from_state_on_every_rank(cls, state, comm, options) -> "DataParallelTrainer":
        """Every rank holds the same ``state``: check and build it locally (the same error on every rank), then
        construct the distributed trainer collectively and load the state into it."""
        single = Trainer.from_state_dict(state, lr=options["lr"], device=options["device"])
        settings = single._settings()
        trainer = cls(single.model, lr=single.lr, comm=comm, on_error=options["on_error"],
                      collective_timeout=options["collective_timeout"], **settings)
        trainer.load_state_dict(single.state_dict())
        return trainer

    def _save_checkpoint(self, path: str) -> None:
        """Collective: rank 0 writes this trainer's state to ``path`` (atomically); its error is everyone's."""
        self.on_root(self.save, path)
        self._last_checkpoint = self.epochs_done

    # -- training: Trainer.fit's loop, with the step hook filled in ---------------------------------------------
    def fit(self, X, y, epochs: int = 1, *, validation_data=None, target_loss: float | None = None,
            patience: int | None = None, restore_best: bool = True, callbacks=(), on_nonfinite: str = "raise",
            verbose: bool | int = False, sample_weight=None, checkpoint_every: int | None = None,
            checkpoint_path=None):
        """Train on this rank's shard ``X, y`` (collective; the same arguments on every rank).

        As :meth:`fastbp.Trainer.fit`, with the data, ``validation_data`` and ``sample_weight`` given as this
        rank's shards, and ``verbose`` showing progress on rank 0 only. Returns the global :class:`History`.
        With sample weights, a global batch's loss is its weighted mean over every rank's rows in it (its
        divisor is their weight sum over every rank); one rank's shard may weigh nothing, not every rank's.

        Parameters
        ----------
        checkpoint_every : int or None
            Save a checkpoint after every ``checkpoint_every``-th epoch (counted across fits, by
            ``epochs_done``), after the callbacks, and once more when the fit ends unless the last epoch was
            just saved: rank 0 writes ``checkpoint_path`` atomically (a crash mid-write leaves the previous
            file). :meth:`load` resumes from it. Checkpoints are per epoch: a run killed mid-epoch repeats that
            epoch, exactly as it first ran. Needs ``checkpoint_path``; the same on every rank.
        checkpoint_path : str or os.PathLike
            The checkpoint file (rank 0's is used; its folder must exist on rank 0).
        """
        # 1. Check everything locally, then agree, so that a bad argument on one rank fails every rank.
        plan, error = None, None
        try:
            plan = self._plan_fit(X, y, epochs, validation_data, target_loss, patience, restore_best, callbacks,
                                  on_nonfinite, verbose, sample_weight)
            if plan.X.shape[0] == 0:
                raise ValueError("this rank's shard of X is empty: give every rank at least one row")
            checkpoint_every, checkpoint_path = self._check_checkpointing(checkpoint_every, checkpoint_path)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        self._agree(error, "checking the arguments of fit")
        self._check_weights(plan.sample_weight, plan.X.shape[0])
        self._check_same("arguments of fit", dict(
            epochs=plan.epochs, target_loss=plan.target, patience=plan.patience, restore_best=plan.restore_best,
            on_nonfinite=plan.on_nonfinite, n_callbacks=len(plan.callbacks), validation=plan.validation is not None,
            checkpoint_every=checkpoint_every, fingerprint=self.fingerprint()))
        if checkpoint_every is not None:  # after the user's callbacks: it saves what they changed too
            def save_checkpoint(trainer, history):
                if trainer.epochs_done % checkpoint_every == 0:
                    trainer._save_checkpoint(checkpoint_path)

            plan.callbacks.append(save_checkpoint)
        self._last_checkpoint = None
        self._step_base, self._reductions = self.steps_done, 0
        # 2. Train; an error on one rank ends the job (the others would wait in the Allreduce forever).
        try:
            self._broadcast_state()
            history = self._run_fit(plan)
            if checkpoint_every is not None and self._last_checkpoint != self.epochs_done:
                self._save_checkpoint(checkpoint_path)
            return history
        except NonFiniteLossError:
            raise  # decided from the reduced loss: every rank raises it together
        except BaseException:
            if self.on_error == "abort" and self.size > 1:
                self._abort()
            raise

    def _check_checkpointing(self, every, path):
        """(checkpoint_every, checkpoint_path) checked: both None, or an int >= 1 and a writable file name (its
        folder checked on rank 0, which writes it)."""
        every = check_int("checkpoint_every", every, minimum=1, allow_none=True)
        if (every is None) != (path is None):
            raise ValueError("checkpoint_every and checkpoint_path go together: give both (save every N epochs to "
                             f"that file) or neither; got checkpoint_every={every!r}, checkpoint_path={path!r}")
        if path is None:
            return None, None
        path = checkpoint._as_path(path)
        if self.is_root:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"checkpoint_path {path!r}: the folder {folder!r} does not exist on rank 0")
            if os.path.isdir(path):
                raise IsADirectoryError(f"checkpoint_path {path!r} is a folder; give a file name")
        return every, path

    def _broadcast_state(self) -> None:
        """Rank 0's parameters and optimizer state become everyone's (the model's arrays are updated)."""
        self._coll.broadcast_buffer(self.model._training_vector(), "broadcasting rank 0's parameters")
        self.model._after_training()
        opt_state = np.ascontiguousarray(self.opt_state)
        self._coll.broadcast_buffer(opt_state, "broadcasting rank 0's optimizer state")
        self._backend.set_optimizer_state(opt_state)

    def _rows_per_epoch(self, n_local: int) -> int:
        counts = np.array(self._coll.allgather(int(n_local), "gathering the shard sizes"), dtype=np.int64)
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
        tick = time.perf_counter()
        self._reductions += 1
        self._coll.allreduce_sum(grads, "the gradient Allreduce of optimizer step",
                                 self._step_base + self._reductions)
        self._allreduce_seconds += time.perf_counter() - tick

    def _reduce_sum(self, values) -> np.ndarray:
        buf = np.array(values, dtype=np.float64)
        self._coll.allreduce_sum(buf, "a per-epoch Allreduce (loss, scores or stop vote) after epoch",
                                 self.epochs_done)
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
