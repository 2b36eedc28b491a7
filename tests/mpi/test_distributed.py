"""N ranks with global batch B train exactly as one process with batch B on the union of their shards.

Run with ``mpiexec -n 2 python -m mpi4py -m pytest tests/mpi``; every test runs on every rank and most of
them are collective (each rank must reach the same calls).
"""
import numpy as np
import pytest

import fastbp
from fastbp.distributed import DataParallelTrainer, MismatchError, shard, shard_bounds

from ._jobs import run_child_job

# Weights after 3 short epochs (39 steps at most), distributed vs one process: they differ only in the order in
# which the ranks' per-row gradients are summed. float64 holds 1e-10 however long the run; the float32 tolerance
# holds for short runs only: rounding differences grow with the steps (W3 after 1,407 steps: up to 6.1e-3, 98.5%
# of the weights outside this tolerance, as far as float32 itself is from float64; docs/scale-out.md).
WEIGHT_TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _data(n=203, n_in=7, k=3, loss="softmax_cross_entropy", dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(dtype)
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, k, n)
    elif loss == "binary_cross_entropy":
        y = (rng.random((n, k)) < 0.5).astype(dtype)
    else:
        y = rng.normal(size=(n, k)).astype(dtype)
    return X, y


def _uneven_shard(X, y, comm):
    """Rank r holds a block whose size grows with r (rank 0 the smallest): not what shard() would cut."""
    size, rank = comm.Get_size(), comm.Get_rank()
    weights = np.arange(1, size + 1)
    cuts = np.concatenate(([0], np.cumsum(weights) * len(X) // weights.sum()))
    return X[cuts[rank]:cuts[rank + 1]], y[cuts[rank]:cuts[rank + 1]]


def _same_on_all_ranks(comm, array):
    everyone = comm.allgather(np.asarray(array))
    return all(np.array_equal(everyone[0], other) for other in everyone[1:])


CASES = [
    dict(loss="softmax_cross_entropy", optimizer="sgd", lr=0.1, momentum=0.9, batch_size=16),
    dict(loss="softmax_cross_entropy", optimizer="adam", lr=0.01, weight_decay=1e-3, batch_size=32),
    dict(loss="mse", optimizer="sgd", lr=0.05, nesterov=True, momentum=0.5, batch_size=10),
    dict(loss="binary_cross_entropy", optimizer="sgd", lr=0.5, batch_size=None),  # full batch, no shuffle
    # clipped after the Allreduce, on the global gradient, as one process clips its batch's
    dict(loss="softmax_cross_entropy", optimizer="adamw", lr=0.01, clip_grad_norm=0.05, batch_size=16),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['loss']}-{c['optimizer']}-{c['batch_size']}" for c in CASES])
@pytest.mark.parametrize("cut", ["shard", "uneven"])
def test_equals_one_process_on_the_union(comm, case, dtype, cut):
    X, y = _data(loss=case["loss"], dtype=dtype)
    Xl, yl = shard(X, y, comm) if cut == "shard" else _uneven_shard(X, y, comm)
    # The union, in rank order, is what one process trains on (here it is X itself).
    union_X = np.concatenate(comm.allgather(Xl))
    np.testing.assert_array_equal(union_X, X)
    make = dict(sizes=[7, 11, 3], activation="tanh", dtype=dtype, seed=1)
    dist = DataParallelTrainer(fastbp.MLP(**make), comm=comm, seed=5, **case)
    ref = fastbp.Trainer(fastbp.MLP(**make), seed=5, **case)
    hist = dist.fit(Xl, yl, epochs=3)
    hist_ref = ref.fit(X, y, epochs=3)
    for w, w_ref in zip(dist.model.weights + dist.model.biases, ref.model.weights + ref.model.biases):
        np.testing.assert_allclose(w, w_ref, **WEIGHT_TOL[dtype])
    np.testing.assert_allclose(dist.opt_state, ref.opt_state, **WEIGHT_TOL[dtype])
    assert dist.steps_done == ref.steps_done and dist.epochs_done == ref.epochs_done == 3
    # The reduced history is the single process's, to float32 accumulation accuracy.
    np.testing.assert_allclose(hist.loss, hist_ref.loss, rtol=1e-5 if dtype == np.float32 else 1e-12)
    # Every rank applied the same updates: parameters are bitwise identical across ranks.
    assert _same_on_all_ranks(comm, dist.model.flat_parameters())
    assert _same_on_all_ranks(comm, hist.loss)


def test_metrics_are_reduced_over_the_union(comm):
    X, y = _data(n=301)
    Xv, yv = _data(n=97, seed=1)
    kw = dict(loss="softmax_cross_entropy", lr=0.1, batch_size=24, seed=2)
    dist = DataParallelTrainer(fastbp.MLP([7, 9, 3], seed=0), comm=comm, **kw)
    ref = fastbp.Trainer(fastbp.MLP([7, 9, 3], seed=0), **kw)
    Xvl, yvl = _uneven_shard(Xv, yv, comm)
    hist = dist.fit(*shard(X, y, comm), epochs=2, validation_data=(Xvl, yvl))
    hist_ref = ref.fit(X, y, epochs=2, validation_data=(Xv, yv))
    np.testing.assert_allclose(hist.val_loss, hist_ref.val_loss, rtol=1e-5)
    np.testing.assert_allclose(hist.val_accuracy, hist_ref.val_accuracy, atol=1.5 / len(Xv))
    scores, scores_ref = dist.evaluate(Xvl, yvl), ref.evaluate(Xv, yv)
    assert scores["loss"] == pytest.approx(scores_ref["loss"], rel=1e-5)
    assert abs(scores["accuracy"] - scores_ref["accuracy"]) <= 1.5 / len(Xv)
    assert comm.allgather(scores) == [scores] * comm.Get_size()
    assert dist.history.loss == hist.loss and dist.history.epoch == [0, 1]


def test_seed_none_still_gives_one_order_and_rank0_initial_weights(comm):
    X, y = _data()
    # Different initial weights per rank: rank 0's are broadcast.
    dist = DataParallelTrainer(fastbp.MLP([7, 5, 3], seed=comm.Get_rank()), comm=comm,
                               loss="softmax_cross_entropy", lr=0.1, batch_size=8, seed=None)
    dist.fit(*shard(X, y, comm), epochs=2)
    assert _same_on_all_ranks(comm, dist.model.flat_parameters())
    assert _same_on_all_ranks(comm, dist.opt_state)


def test_mismatched_models_are_refused_on_every_rank(comm):
    width = 8 + comm.Get_rank()
    with pytest.raises(MismatchError, match="sizes"):
        DataParallelTrainer(fastbp.MLP([4, width, 2]), comm=comm, loss="mse")
    dtype = np.float32 if comm.Get_rank() == 0 else np.float64
    with pytest.raises(MismatchError, match="dtype"):
        DataParallelTrainer(fastbp.MLP([4, 8, 2], dtype=dtype), comm=comm, loss="mse")
    with pytest.raises(MismatchError, match="lr"):
        DataParallelTrainer(fastbp.MLP([4, 8, 2]), comm=comm, loss="mse", lr=0.1 * (1 + comm.Get_rank()))


def test_mismatched_fit_arguments_and_bad_data_fail_every_rank(comm):
    X, y = _data(n_in=4, k=2, loss="mse")
    trainer = DataParallelTrainer(fastbp.MLP([4, 8, 2]), comm=comm, loss="mse", seed=0)
    Xl, yl = shard(X, y, comm)
    with pytest.raises(MismatchError, match="epochs"):
        trainer.fit(Xl, yl, epochs=1 + comm.Get_rank())
    bad = Xl.copy()
    if comm.Get_rank() == 1:
        bad[0, 0] = np.nan
    expected = ValueError if comm.Get_rank() == 1 else RuntimeError
    with pytest.raises(expected, match="nan|rank 1"):
        trainer.fit(bad, yl, epochs=1)
    assert trainer.epochs_done == 0  # nothing trained; the trainer still works
    trainer.fit(Xl, yl, epochs=1)
    assert _same_on_all_ranks(comm, trainer.model.flat_parameters())


def test_on_root_runs_once_and_shares_errors(comm, tmp_path_factory):
    trainer = DataParallelTrainer(fastbp.MLP([3, 2]), comm=comm, loss="mse")
    path = comm.bcast(str(tmp_path_factory.mktemp("ckpt") / "w.npy") if comm.Get_rank() == 0 else None)
    calls = []

    def save(p):
        calls.append(p)
        np.save(p, trainer.model.weights[0])
        return "saved"

    result = trainer.on_root(save, path)
    assert (result, len(calls)) == (("saved", 1) if comm.Get_rank() == 0 else (None, 0))

    def broken():
        raise OSError("disk full")

    with pytest.raises((OSError, RuntimeError), match="disk full"):
        trainer.on_root(broken)


def test_shard_bounds_cover_the_rows_once():
    for n in (0, 1, 7, 203):
        for size in (1, 2, 3, 8):
            blocks = [shard_bounds(n, size, r) for r in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_a_failing_rank_ends_the_job_instead_of_hanging(comm):
    """Rank 0 launches a separate 2-rank job whose rank 1 raises mid-training; rank 1 waits here."""
    returncode, seconds, output, _ = run_child_job(comm, "_failing_rank.py", 2)
    assert returncode is not None, f"the job hung: still running after {seconds:.0f} s\n{output[-2000:]}"
    assert returncode != 0, output[-2000:]
    assert "deliberate failure on rank 1" in output and "aborting all 2 ranks" in output
    assert "unreachable" not in output
    assert seconds < 120, f"the job took {seconds:.0f} s to fail"


def test_nonfinite_loss_restores_and_raises_on_every_rank_like_one_process(comm):
    X, y = _data(loss="mse", k=3)
    X = X * 100
    kw = dict(loss="mse", lr=5.0, batch_size=16, seed=0)
    dist = DataParallelTrainer(fastbp.MLP([7, 6, 3], seed=0), comm=comm, **kw)
    ref = fastbp.Trainer(fastbp.MLP([7, 6, 3], seed=0), **kw)
    with pytest.raises(fastbp.NonFiniteLossError):
        ref.fit(X, y, epochs=5)
    with pytest.raises(fastbp.NonFiniteLossError):
        dist.fit(*shard(X, y, comm), epochs=5)
    assert dist.epochs_done == ref.epochs_done and dist.steps_done == ref.steps_done
    for w, w_ref in zip(dist.model.weights, ref.model.weights):
        np.testing.assert_allclose(w, w_ref, rtol=1e-3, atol=1e-3)
        assert np.isfinite(w).all()
    assert _same_on_all_ranks(comm, dist.model.flat_parameters())


def test_stopping_rules_are_taken_together(comm):
    X, y = _data()
    kw = dict(loss="softmax_cross_entropy", lr=0.1, batch_size=16, seed=0)
    dist = DataParallelTrainer(fastbp.MLP([7, 6, 3], seed=0), comm=comm, **kw)
    # A callback that asks to stop on rank 1 only, after epoch 2: every rank stops there.
    hist = dist.fit(*shard(X, y, comm), epochs=10,
                    callbacks=[lambda trainer, h: comm.Get_rank() == 1 and len(h.loss) == 2])
    assert (hist.stop_reason, len(hist.loss)) == ("callback", 2)
    ref = fastbp.Trainer(fastbp.MLP([7, 6, 3], seed=0), **kw)
    ref_hist = ref.fit(X, y, epochs=10, target_loss=0.95)
    dist = DataParallelTrainer(fastbp.MLP([7, 6, 3], seed=0), comm=comm, **kw)
    hist = dist.fit(*shard(X, y, comm), epochs=10, target_loss=0.95)
    assert hist.stop_reason == ref_hist.stop_reason and len(hist.loss) == len(ref_hist.loss)
    Xv, yv = _data(n=50, seed=3)
    dist = DataParallelTrainer(fastbp.MLP([7, 6, 3], seed=0), comm=comm, **kw)
    ref = fastbp.Trainer(fastbp.MLP([7, 6, 3], seed=0), **kw)
    hist = dist.fit(*shard(X, y, comm), epochs=12, validation_data=shard(Xv, yv, comm), patience=2)
    ref_hist = ref.fit(X, y, epochs=12, validation_data=(Xv, yv), patience=2)
    assert hist.stop_reason == ref_hist.stop_reason and len(hist.loss) == len(ref_hist.loss)
    np.testing.assert_allclose(dist.model.weights[0], ref.model.weights[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("verbose", [True, 2])
def test_progress_on_rank0_only_keeps_the_ranks_in_step(comm, capsys, verbose):
    # Only rank 0 shows progress; the chunking of epochs and the per-epoch stop vote must still be the same
    # on every rank (a vote taken only where the bar is shown left the ranks in different collectives).
    X, y = _data(n=120)
    kw = dict(loss="softmax_cross_entropy", lr=0.1, batch_size=16, seed=0)
    dist = DataParallelTrainer(fastbp.MLP([7, 6, 3], seed=0), comm=comm, **kw)
    ref = fastbp.Trainer(fastbp.MLP([7, 6, 3], seed=0), **kw)
    hist = dist.fit(*shard(X, y, comm), epochs=4, verbose=verbose)
    ref_hist = ref.fit(X, y, epochs=4)
    err = capsys.readouterr().err
    assert ("epoch" in err) == (comm.Get_rank() == 0)
    np.testing.assert_allclose(hist.loss, ref_hist.loss, rtol=1e-5)
    assert _same_on_all_ranks(comm, dist.model.flat_parameters())


@pytest.mark.parametrize("batch_size", [16, None])
@pytest.mark.parametrize("zero_shard", [False, True], ids=["weighted", "rank0-weighs-nothing"])
def test_weighted_fit_and_evaluate_equal_one_process(comm, batch_size, zero_shard):
    """Each rank passes its shard's weights; a global batch's divisor is its weight sum over every rank. With
    zero_shard, rank 0's whole shard weighs 0 (allowed: the union does not)."""
    dtype = np.float64
    X, y = _data(loss="softmax_cross_entropy", dtype=dtype)
    w = np.random.default_rng(3).uniform(0.0, 3.0, size=len(X))
    w[::5] = 0.0
    Xl, yl = _uneven_shard(X, y, comm)
    cuts = np.cumsum([0] + comm.allgather(len(Xl)))
    if zero_shard:
        w[:cuts[1]] = 0.0
    wl = w[cuts[comm.Get_rank()]:cuts[comm.Get_rank() + 1]]
    kw = dict(loss="softmax_cross_entropy", optimizer="adam", lr=0.01, batch_size=batch_size, seed=5)
    make = dict(sizes=[7, 11, 3], activation="tanh", dtype=dtype, seed=1)
    dist = DataParallelTrainer(fastbp.MLP(**make), comm=comm, **kw)
    ref = fastbp.Trainer(fastbp.MLP(**make), **kw)
    hist = dist.fit(Xl, yl, epochs=3, sample_weight=wl)
    hist_ref = ref.fit(X, y, epochs=3, sample_weight=w)
    np.testing.assert_allclose(dist.model.flat_parameters(), ref.model.flat_parameters(), **WEIGHT_TOL[dtype])
    np.testing.assert_allclose(hist.loss, hist_ref.loss, rtol=1e-12)
    assert dist.steps_done == ref.steps_done
    assert _same_on_all_ranks(comm, dist.model.flat_parameters())
    scores, scores_ref = dist.evaluate(Xl, yl, sample_weight=wl), ref.evaluate(X, y, sample_weight=w)
    assert scores["loss"] == pytest.approx(scores_ref["loss"], rel=1e-12)
    assert scores["accuracy"] == pytest.approx(scores_ref["accuracy"], rel=1e-12)
    assert comm.allgather(scores) == [scores] * comm.Get_size()
    # The weights counted: the unweighted fit ends elsewhere.
    plain = DataParallelTrainer(fastbp.MLP(**make), comm=comm, **kw)
    plain.fit(Xl, yl, epochs=3)
    assert np.abs(plain.model.flat_parameters() - dist.model.flat_parameters()).max() > 1e-4


def test_weights_zero_on_every_rank_are_refused_on_every_rank(comm):
    X, y = _data()
    Xl, yl = shard(X, y, comm)
    trainer = DataParallelTrainer(fastbp.MLP([7, 5, 3], seed=0), comm=comm, loss="softmax_cross_entropy",
                                  lr=0.1, batch_size=8, seed=0)
    before = trainer.model.flat_parameters()
    for call in (lambda: trainer.fit(Xl, yl, epochs=1, sample_weight=np.zeros(len(Xl))),
                 lambda: trainer.evaluate(Xl, yl, sample_weight=np.zeros(len(Xl)))):
        with pytest.raises(ValueError, match="sample_weight must not be all zero over every rank"):
            call()
    np.testing.assert_array_equal(trainer.model.flat_parameters(), before)
    assert trainer.steps_done == 0
    bad = np.ones(len(Xl))
    if comm.Get_rank() == 1:
        bad[0] = -1.0
    expected = ValueError if comm.Get_rank() == 1 else RuntimeError
    with pytest.raises(expected, match=">= 0|rank 1"):
        trainer.fit(Xl, yl, epochs=1, sample_weight=bad)
    assert trainer.steps_done == 0
