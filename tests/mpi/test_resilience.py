"""A distributed run survives what happens on clusters: it checkpoints and resumes (on any number of ranks) to
the weights of an uninterrupted run, and a rank that stops answering is named and ends the job instead of
hanging it. Run with ``mpiexec -n 2 python -m mpi4py -m pytest tests/mpi`` (see .ci/steps/mpi.sh).
"""
import re

import numpy as np
import pytest

import fastbp
from fastbp.checkpoint import CheckpointError
from fastbp.distributed import NOTICE_GRACE_SECONDS, DataParallelTrainer, shard

from ._jobs import RESUME_SETTINGS, resume_model, resume_problem, run_child_job


def _shared_path(comm, tmp_path_factory, name):
    """A file name in a folder that rank 0 made (the ranks of this test job share a disk)."""
    folder = str(tmp_path_factory.mktemp("ckpt")) if comm.Get_rank() == 0 else None
    return comm.bcast(folder, root=0) + "/" + name


def _parameters(trainer):
    return np.concatenate([trainer.model.flat_parameters(), trainer.opt_state.ravel()])


# -- checkpoints and resuming -----------------------------------------------------------------------------------
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_weights(comm, tmp_path_factory):
    """A 2-rank job checkpoints every epoch until its rank 1 is SIGKILLed inside an epoch; the run resumed from
    the last checkpoint equals an uninterrupted run bit for bit on 2 ranks, and to summation order on 1 rank."""
    X, y = resume_problem()
    Xl, yl = shard(X, y, comm)
    path = _shared_path(comm, tmp_path_factory, "run.npz")
    # This job's kernels first (rank 0's cache is the child job's): the child's two ranks then only load them.
    DataParallelTrainer(resume_model(), comm=comm, **RESUME_SETTINGS).fit(Xl, yl, epochs=1)
    kill_after = 3
    returncode, seconds, output, _ = run_child_job(comm, "_checkpointed_run.py", 2, [path, kill_after])
    assert returncode not in (None, 0), f"the run was not killed ({returncode}, {seconds:.0f} s):\n{output[-3000:]}"
    assert "unreachable" not in output

    resumed = DataParallelTrainer.load(path, comm=comm)
    done = resumed.epochs_done
    assert done >= kill_after and resumed.steps_done == done * -(-len(X) // RESUME_SETTINGS["batch_size"])
    resumed.fit(Xl, yl, epochs=4)
    uninterrupted = DataParallelTrainer(resume_model(), comm=comm, **RESUME_SETTINGS)
    uninterrupted.fit(Xl, yl, epochs=done + 4)
    np.testing.assert_array_equal(_parameters(resumed), _parameters(uninterrupted))
    assert resumed.history.loss == uninterrupted.history.loss and resumed.history.lr == uninterrupted.history.lr
    assert resumed.history.epoch == list(range(done + 4))

    # Each rank alone (a communicator of 1) resumes the same file on the whole data: one process's result.
    alone = comm.Split(color=comm.Get_rank(), key=0)
    one_rank = DataParallelTrainer.load(path, comm=alone)
    one_rank.fit(X, y, epochs=4)
    single = fastbp.Trainer.load(path)
    single.fit(X, y, epochs=4)
    np.testing.assert_allclose(_parameters(one_rank), _parameters(single), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_parameters(one_rank), _parameters(uninterrupted), rtol=1e-10, atol=1e-12)
    alone.Free()


def test_checkpoints_every_n_epochs_and_at_the_end(comm, tmp_path_factory):
    X, y = resume_problem(n=97)
    path = _shared_path(comm, tmp_path_factory, "every3.npz")
    seen = []  # the checkpoint's epoch as each epoch's callbacks begin (user callbacks run before the save)

    def look(trainer, history):
        seen.append(fastbp.Trainer.load(path).epochs_done if trainer.on_root(_exists, path) else None)

    trainer = DataParallelTrainer(resume_model(), comm=comm, **RESUME_SETTINGS)
    trainer.fit(*shard(X, y, comm), epochs=7, checkpoint_every=3, checkpoint_path=path,
                callbacks=[lambda t, h: look(t, h) if comm.Get_rank() == 0 else t.on_root(_exists, path)])
    if comm.Get_rank() == 0:
        assert seen == [None, None, None, 3, 3, 3, 6]
    saved = fastbp.Trainer.load(path)
    assert saved.epochs_done == 7
    np.testing.assert_array_equal(_parameters(saved), _parameters(trainer))
    # Counted across fits: 2 more epochs (8, 9) save at 9 and not at 8 ... and at the end, 9.
    trainer.fit(*shard(X, y, comm), epochs=2, checkpoint_every=3, checkpoint_path=path)
    assert fastbp.Trainer.load(path).epochs_done == 9


def _exists(path):
    import os

    return os.path.exists(path)


def test_bad_checkpoint_arguments_fail_every_rank_and_change_nothing(comm, tmp_path_factory):
    X, y = resume_problem(n=40)
    Xl, yl = shard(X, y, comm)
    trainer = DataParallelTrainer(resume_model(), comm=comm, **RESUME_SETTINGS)
    before = _parameters(trainer)
    with pytest.raises(ValueError, match="checkpoint_every and checkpoint_path go together"):
        trainer.fit(Xl, yl, epochs=1, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        trainer.fit(Xl, yl, epochs=1, checkpoint_every=0, checkpoint_path="x.npz")
    missing = _shared_path(comm, tmp_path_factory, "no/such/folder/run.npz")
    expected = FileNotFoundError if comm.Get_rank() == 0 else RuntimeError
    with pytest.raises(expected, match="does not exist on rank 0|rank 0 failed"):
        trainer.fit(Xl, yl, epochs=1, checkpoint_every=1, checkpoint_path=missing)
    assert trainer.epochs_done == 0
    np.testing.assert_array_equal(_parameters(trainer), before)


def test_load_errors_are_raised_on_every_rank_as_the_same_exception(comm, tmp_path_factory):
    path = _shared_path(comm, tmp_path_factory, "model.npz")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        DataParallelTrainer.load(path, comm=comm)
    if comm.Get_rank() == 0:
        resume_model().save(path)
    comm.Barrier()
    with pytest.raises(CheckpointError, match="holds a model, not a trainer"):
        DataParallelTrainer.load(path, comm=comm)
    with pytest.raises(TypeError, match="comm"):
        DataParallelTrainer.load(path)  # the call that once failed as a "damaged file"
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        DataParallelTrainer.load(path, comm=None)


def test_from_state_dict_uses_rank_0s_state_on_every_rank(comm):
    X, y = resume_problem(n=64)
    single = fastbp.Trainer(resume_model(), **RESUME_SETTINGS)
    single.fit(X, y, epochs=2)
    state = single.state_dict() if comm.Get_rank() == 0 else None
    trainer = DataParallelTrainer.from_state_dict(state, comm=comm, collective_timeout=120)
    assert (trainer.epochs_done, trainer.steps_done, trainer.collective_timeout) == (2, single.steps_done, 120.0)
    np.testing.assert_array_equal(_parameters(trainer), _parameters(single))
    # Trained on: the same as the single process goes on (to summation order), every rank identical.
    trainer.fit(*shard(X, y, comm), epochs=2)
    single.fit(X, y, epochs=2)
    np.testing.assert_allclose(_parameters(trainer), _parameters(single), rtol=1e-10, atol=1e-12)
    everyone = comm.allgather(_parameters(trainer))
    assert all(np.array_equal(everyone[0], other) for other in everyone[1:])


# -- a rank that stops answering ---------------------------------------------------------------------------------
@pytest.mark.parametrize("on_error", ["abort", "raise"])
def test_a_stopped_rank_is_named_by_every_live_rank_within_the_timeout(comm, on_error):
    """A 3-rank job whose rank 1 is SIGSTOPped mid-training (it neither dies nor answers): ranks 0 and 2 each
    raise CollectiveTimeoutError naming rank 1 within collective_timeout + the notice grace, and the job ends
    (with on_error="abort" fastbp aborts it; with "raise" the script catches the error and aborts)."""
    timeout = 3.0
    # The child's kernels (float32, the stepwise path) in rank 0's cache first: its 3 ranks only load them.
    rng = np.random.default_rng(0)
    if comm.Get_rank() == 0:
        DataParallelTrainer(fastbp.MLP([5, 8, 3], seed=0), comm=_self(),
                            loss="softmax_cross_entropy", lr=0.1, batch_size=8, seed=0).fit(
            rng.normal(size=(16, 5)).astype(np.float32), rng.integers(0, 3, 16), epochs=1)
    returncode, seconds, output, ended = run_child_job(comm, "_stopped_rank.py", 3, [timeout, on_error])
    assert returncode is not None, f"the job hung: still running after {seconds:.0f} s\n{output[-3000:]}"
    assert returncode != 0 and "unreachable" not in output, output[-3000:]
    stopped = re.search(r"STOPPED rank 1 at ([0-9.]+)", output)
    assert stopped, output[-3000:]
    stopped_at = float(stopped.group(1))
    if on_error == "abort":
        for rank in (0, 2):
            assert re.search(rf"rank {rank}: CollectiveTimeoutError: rank 1 did not reach .* within "
                             rf"collective_timeout=3 s", output), output[-3000:]
        assert "aborting all 3 ranks" in output
    else:
        for rank in (0, 2):
            caught = re.search(rf"CAUGHT rank {rank} at ([0-9.]+) missing=\[1\]: rank 1 did not reach", output)
            assert caught, output[-3000:]
            latency = float(caught.group(1)) - stopped_at
            # The live ranks started waiting after the stop (or just before it): the error comes after the timeout
            # and the grace, with slack for a busy machine.
            assert timeout - 0.2 < latency < timeout + NOTICE_GRACE_SECONDS + 5, (rank, latency)
    assert ended - stopped_at < timeout + NOTICE_GRACE_SECONDS + 15, f"the job ended {ended - stopped_at:.1f} s later"


def _self():
    from mpi4py import MPI

    return MPI.COMM_SELF
