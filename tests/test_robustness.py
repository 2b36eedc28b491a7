"""Training that goes wrong loses nothing; numerical extremes stay finite; results are reproducible across
runs, thread counts and concurrent Python threads."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import fastbp

from . import naive
from .conftest import TOLERANCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(n=40, n_in=4, k=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype(dtype), rng.integers(0, k, size=n)


def make_trainer(dtype=np.float64, lr=0.05, optimizer="adam", batch_size=8, sizes=(4, 8, 3), **kwargs):
    model = fastbp.MLP(list(sizes), "tanh", dtype=dtype, seed=1)
    return fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer, lr=lr, batch_size=batch_size,
                          seed=2, **kwargs)


def state(trainer):
    """Everything that decides how training continues."""
    return (trainer.model.flat_parameters().tobytes(), trainer.opt_state.tobytes(), trainer.steps_done,
            trainer.epochs_done, repr(trainer._rng.bit_generator.state))


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert sa[2:] == sb[2:]
    assert sa[0] == sb[0], "weights differ"
    assert sa[1] == sb[1], "optimizer state differs"


def reference(epochs, **kwargs):
    """A trainer that ran exactly ``epochs`` epochs without incident."""
    trainer = make_trainer(**kwargs)
    X, y = problem()
    trainer.fit(X, y, epochs=epochs)
    return trainer


def assert_consistent(trainer, history=None):
    """Model, optimizer state, RNG and history all describe the same last completed epoch."""
    n = trainer.epochs_done
    assert trainer.history.epoch == list(range(n))
    assert len(trainer.history.loss) == len(trainer.history.lr) == len(trainer.history.time) == n
    if history is not None:
        assert history.epoch == trainer.history.epoch[n - len(history.epoch):]


# -- KeyboardInterrupt -------------------------------------------------------------------------------------------
def test_keyboard_interrupt_in_callback_keeps_last_completed_epoch():
    X, y = problem()

    def interrupt_at_epoch_3(trainer, history):
        if trainer.epochs_done == 3:
            raise KeyboardInterrupt

    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=10, callbacks=[interrupt_at_epoch_3])
    assert trainer.epochs_done == 3
    assert_consistent(trainer)
    assert_same_state(trainer, reference(3))
    # Training on afterwards is the same as never having been interrupted.
    trainer.fit(X, y, epochs=4)
    assert_same_state(trainer, reference(7))
    assert trainer.history.loss == reference(7).history.loss


def test_keyboard_interrupt_in_validation_epoch_keeps_history_aligned():
    X, y = problem()

    def stop(trainer, history):
        if len(history.loss) == 2:
            raise KeyboardInterrupt

    trainer = make_trainer()
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, epochs=5, validation_data=(X, y), callbacks=[stop])
    assert len(trainer.history.loss) == len(trainer.history.val_loss) == len(trainer.history.val_accuracy) == 2
    assert_same_state(trainer, reference(2))


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="needs POSIX signals")
def test_sigint_during_compiled_training_keeps_model_and_history_consistent():
    """A real Ctrl-C (SIGINT to this process) while fit is inside its compiled multi-epoch calls."""
    X, y = problem(n=64)
    trainer = make_trainer(batch_size=16)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(X, y, epochs=10_000_000)  # minutes: the interrupt always comes first
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    done = trainer.epochs_done
    assert done > 0
    assert_consistent(trainer)
    ref = make_trainer(batch_size=16)
    ref.fit(X, y, epochs=done)
    assert_same_state(trainer, ref)
    assert trainer.history.loss == ref.history.loss
    trainer.fit(X, y, epochs=3)
    ref.fit(X, y, epochs=3)
    assert_same_state(trainer, ref)


def _count_calls(trainer):
    counts = []
    original = trainer._backend.train_epochs

    def counting(X, Y, batch_size, orders, lrs, target, steps_done):
        counts.append(len(lrs))
        return original(X, Y, batch_size, orders, lrs, target, steps_done)

    trainer._backend.train_epochs = counting
    return counts


def test_a_small_fit_runs_in_one_compiled_call():
    """The first call is sized from a pessimistic guess of an epoch's cost: a small network's whole fit (here
    3000 epochs of 64 rows, about 0.03 s) is one call, not a ladder of calls that each cost more to enter
    than their epochs."""
    X, y = problem(n=64)
    trainer = make_trainer(batch_size=16)
    counts = _count_calls(trainer)
    trainer.fit(X, y, epochs=3000)
    assert counts == [3000]
    assert_same_state(trainer, _ref_3000(X, y))


def test_the_first_call_of_a_large_fit_is_one_epoch():
    """W3's network on 60000 rows: the guess (several seconds an epoch) gives a first call of one epoch."""
    trainer = fastbp.Trainer(fastbp.MLP([784, 256, 256, 10], "relu", seed=0), loss="softmax_cross_entropy",
                             batch_size=128)
    plan = fastbp.trainer._FitPlan(X=None, Y=None, epochs=10, target=None, validation=None, patience=None,
                                   restore_best=False, callbacks=[], on_nonfinite="raise", verbose=0)
    plan.n, plan.batch_size = 60000, 128
    assert trainer._first_chunk(plan, max_chunk=69) == 1
    plan.n, plan.batch_size = 100, 100  # W1: 1-16-1, full batch: a whole 1000-epoch fit at once
    w1 = fastbp.Trainer(fastbp.MLP([1, 16, 1], "sigmoid", seed=0), loss="mse")
    assert w1._first_chunk(plan, max_chunk=1000) == 1000


def test_compiled_calls_grow_gradually(monkeypatch):
    """After a first call of one epoch (forced here by a hopeless guess), epochs per call grow at most 8-fold
    a call towards CHUNK_SECONDS of work, so Ctrl-C is never held back for long (wall-clock limits are not
    asserted: CI machines are noisy)."""
    monkeypatch.setattr(fastbp.trainer, "GUESS_SECONDS_PER_MULTIPLY_ADD", 1.0)
    X, y = problem(n=64)
    trainer = make_trainer(batch_size=16)
    counts = _count_calls(trainer)
    trainer.fit(X, y, epochs=3000)
    assert counts[0] == 1 and sum(counts) == 3000 and len(counts) > 1
    assert all(b <= 8 * a for a, b in zip(counts, counts[1:-1]))
    assert_same_state(trainer, _ref_3000(X, y))  # chunking never changes the result


def _ref_3000(X, y):
    ref = make_trainer(batch_size=16)
    ref.fit(X, y, epochs=3000, callbacks=[lambda t, h: None])  # one epoch per call
    return ref


# -- non-finite loss ----------------------------------------------------------------------------------------------
def diverging_trainer(optimizer, lr):
    """float32 regression whose learning rate grows tenfold an epoch: it blows up after a few epochs."""
    model = fastbp.MLP([4, 8, 3], "relu", dtype=np.float32, seed=1)
    extra = dict(momentum=0.9) if optimizer == "sgd" else {}
    return fastbp.Trainer(model, loss="mse", optimizer=optimizer, lr=lr, batch_size=8, seed=2, **extra)


def regression_data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(40, 4)) * 10, rng.normal(size=(40, 3)) * 10


@pytest.mark.parametrize("on_nonfinite", ["raise", "warn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_nonfinite_loss_restores_last_finite_epoch_with_optimizer_state(optimizer, on_nonfinite):
    X, y = regression_data()
    schedule = fastbp.ExponentialDecay(1e-4, 10.0)
    trainer = diverging_trainer(optimizer, schedule)
    if on_nonfinite == "raise":
        with pytest.raises(fastbp.NonFiniteLossError, match=r"in epoch \d+ .*Try a lower learning rate") as info:
            trainer.fit(X, y, epochs=200)
        message = str(info.value)
    else:
        with pytest.warns(RuntimeWarning, match=r"in epoch \d+ .*lower learning rate") as record:
            history = trainer.fit(X, y, epochs=200, on_nonfinite="warn")
        assert history.stop_reason == "nonfinite"
        message = str(record[0].message)
    done = trainer.epochs_done
    assert 1 <= done < 200
    assert f"in epoch {done} " in message  # names the epoch that failed: the one after the last kept
    assert_consistent(trainer)
    assert np.isfinite(trainer.history.loss).all()
    ref = diverging_trainer(optimizer, schedule)
    ref.fit(X, y, epochs=done)
    assert_same_state(trainer, ref)  # weights, optimizer state, step count, epoch count, RNG
    assert trainer.history.loss == ref.history.loss
    # Training on from here continues exactly as the uninterrupted reference does.
    trainer.set_lr(1e-9)
    ref.set_lr(1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(X, y, epochs=1, on_nonfinite="warn")
        ref.fit(X, y, epochs=1, on_nonfinite="warn")
    assert_same_state(trainer, ref)


def test_nonfinite_in_first_epoch_leaves_initial_state():
    X, y = regression_data()
    trainer = diverging_trainer("sgd", 1e30)
    before = state(trainer)
    with pytest.raises(fastbp.NonFiniteLossError, match="in epoch 0 "):
        trainer.fit(X, y, epochs=5)
    assert state(trainer) == before
    assert trainer.history.loss == []


# -- bad schedule values mid-fit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("per_epoch", [False, True])
def test_schedule_failing_mid_fit_stops_at_that_epoch(per_epoch):
    X, y = problem()

    def schedule(epoch):
        return 0.05 if epoch < 3 else float("nan")

    trainer = make_trainer(lr=schedule)
    callbacks = [lambda t, h: None] if per_epoch else []
    with pytest.raises(ValueError, match=r"lr schedule at epoch 3 must be finite; got nan"):
        trainer.fit(X, y, epochs=8, callbacks=callbacks)
    assert trainer.epochs_done == 3
    assert_consistent(trainer)
    assert_same_state(trainer, reference(3))


def test_schedule_raising_its_own_error_mid_fit():
    X, y = problem()

    def schedule(epoch):
        if epoch == 2:
            raise ZeroDivisionError("user bug")
        return 0.05

    trainer = make_trainer(lr=schedule)
    with pytest.raises(ZeroDivisionError):
        trainer.fit(X, y, epochs=6)
    assert_consistent(trainer)
    ref = make_trainer()
    ref.fit(X, y, epochs=trainer.epochs_done)
    assert_same_state(trainer, ref)


# -- numerical extremes ---------------------------------------------------------------------------------------------
LOSSES = ["mse", "binary_cross_entropy", "softmax_cross_entropy"]


def targets(loss, n, k, rng):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, k, size=n)
    if loss == "binary_cross_entropy":
        return rng.integers(0, 2, size=(n, k)).astype(float)
    return rng.normal(size=(n, k))


@pytest.mark.parametrize("loss", LOSSES)
def test_logits_of_plus_minus_1e4_stay_finite(loss, dtype):
    rng = np.random.default_rng(0)
    model = fastbp.MLP([3, 4, 3], "sigmoid", dtype=dtype, seed=0)
    model.biases[-1][...] = [1e4, -1e4, 0.0]
    X, y = rng.normal(size=(6, 3)), targets(loss, 6, 3, rng)
    trainer = fastbp.Trainer(model, loss=loss, lr=1e-6, batch_size=None)
    value, dweights, dbiases = trainer.loss_and_grads(X, y)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in dweights + dbiases)
    out = trainer.predict(X)
    assert np.isfinite(out).all()
    if loss != "mse":
        assert ((out >= 0) & (out <= 1)).all()
    if loss != "mse":  # the reference agrees
        with np.errstate(over="ignore"):  # the reference's plain sigmoid overflows; fastbp's is stable
            ref_value, _, _ = naive.loss_and_grads(model.weights, model.biases, model.activations, loss, X,
                                                   naive.one_hot(y, 3) if y.ndim == 1 else y)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    trainer.fit(X, y, epochs=1)
    assert all(np.isfinite(w).all() for w in model.weights)


def test_poisson_log_rates_at_the_extremes(dtype):
    """poisson's output is exp(z): a log-rate of -1e4 is a rate of 0 and its loss stays finite (-y z), as the
    reference; one of +1e4 is an infinite rate, so fit stops with NonFiniteLossError and restores the weights
    (there is no finite form of exp(1e4), in PyTorch either)."""
    rng = np.random.default_rng(0)
    model = fastbp.MLP([3, 4, 2], "tanh", dtype=dtype, seed=0)
    X, y = rng.normal(size=(6, 3)), rng.poisson(2.0, size=(6, 2)).astype(float)
    trainer = fastbp.Trainer(model, loss="poisson", lr=1e-6, batch_size=None)
    model.biases[-1][...] = [-1e4, 0.0]
    value, dweights, dbiases = trainer.loss_and_grads(X, y)
    ref_value, _, _ = naive.loss_and_grads(model.weights, model.biases, model.activations, "poisson", X, y)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert all(np.isfinite(g).all() for g in dweights + dbiases)
    assert (trainer.predict(X)[:, 0] == 0).all()
    model.biases[-1][...] = [1e4, 0.0]
    before = model.flat_parameters()
    with pytest.raises(fastbp.NonFiniteLossError, match="in epoch 0 "):
        trainer.fit(X, y, epochs=2)
    np.testing.assert_array_equal(model.flat_parameters(), before)
    assert trainer.steps_done == 0


@pytest.mark.parametrize("act", ["sigmoid", "relu", "tanh", "identity", "leaky_relu"])
@pytest.mark.parametrize("loss", LOSSES)
def test_inputs_of_1e6_scale_stay_finite(act, loss, dtype):
    # The activation under test takes the 1e6-scale inputs. After an unbounded one (identity, relu, leaky_relu),
    # relu and leaky_relu pass that scale on to the logits for the loss; a bounded one (sigmoid, tanh) stands
    # alone, as its outputs are bounded whatever follows. So the cases train with the fused narrow kernels of
    # sigmoid networks, tanh networks and the relu family (narrow.kernel_key), which the rest of the suite
    # compiles too, rather than kernels of their own (a network with all four: six more kernels, about 2 s each).
    rng = np.random.default_rng(1)
    hidden = [act] if act in ("sigmoid", "tanh") else [act, "relu", "leaky_relu"]
    model = fastbp.MLP([5] + [7] * len(hidden) + [2], hidden, dtype=dtype, seed=0)
    X, y = rng.normal(size=(12, 5)) * 1e6, targets(loss, 12, 2, rng)
    trainer = fastbp.Trainer(model, loss=loss, lr=1e-15, batch_size=5)
    value, dweights, dbiases = trainer.loss_and_grads(X, y)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in dweights + dbiases)
    assert np.isfinite(trainer.predict(X)).all()
    history = trainer.fit(X, y, epochs=2)
    assert np.isfinite(history.loss).all() and all(np.isfinite(w).all() for w in model.weights)


def test_one_sample_and_batch_larger_than_dataset(dtype):
    """n = 1 with batch_size 32, and n = 7 with batch_size 100: one full-batch step, as in the reference."""
    rng = np.random.default_rng(2)
    for n in (1, 7):
        model = fastbp.MLP([3, 4, 2], "sigmoid", dtype=dtype, seed=0)
        X, y = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
        _, dw, db = naive.loss_and_grads(model.weights, model.biases, ["sigmoid"], "mse", X, y)
        expected = [w - 0.1 * g for w, g in zip(model.weights + model.biases, dw + db)]
        trainer = fastbp.Trainer(model, loss="mse", lr=0.1, batch_size=32 if n == 1 else 100, seed=0)
        history = trainer.fit(X, y, epochs=1)
        assert len(history.loss) == 1 and trainer.steps_done == 1
        tol = TOLERANCES[dtype]
        for got, ref in zip(model.weights + model.biases, expected):
            np.testing.assert_allclose(got, ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


# One activation set per network, each trained by a fused narrow kernel that other tests compile too
# (narrow.kernel_key): sigmoid, tanh, and the relu family.
@pytest.mark.parametrize("hidden", [["sigmoid"] * 4, ["tanh"] * 4, ["relu", "leaky_relu"] * 2],
                         ids=["sigmoid", "tanh", "relu-leaky_relu"])
@pytest.mark.parametrize("loss", LOSSES)
def test_width_one_hidden_layers(loss, hidden, dtype):
    rng = np.random.default_rng(3)
    model = fastbp.MLP([3, 1, 1, 1, 1, 2], hidden, dtype=dtype, seed=4)
    for bias in model.biases[:-1]:
        bias[...] = 0.5  # keeps each relu unit alive
    X, y = rng.normal(size=(9, 3)), targets(loss, 9, 2, rng)
    trainer = fastbp.Trainer(model, loss=loss, lr=0.1, batch_size=4, seed=0)
    value, dw, db = trainer.loss_and_grads(X, y)
    Y = naive.one_hot(y, 2) if y.ndim == 1 else y
    ref_value, ref_dw, ref_db = naive.loss_and_grads(model.weights, model.biases, model.activations, loss, X, Y)
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(value, ref_value, **tol)
    for got, ref in zip(dw + db, ref_dw + ref_db):
        np.testing.assert_allclose(got, ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    history = trainer.fit(X, y, epochs=3)
    assert np.isfinite(history.loss).all()


# -- reproducibility --------------------------------------------------------------------------------------------------
def test_same_seed_same_weights_bit_for_bit(dtype):
    X, y = problem(n=50, dtype=dtype)
    weights = []
    for _ in range(2):
        trainer = make_trainer(dtype=dtype)
        trainer.fit(X, y, epochs=5)
        weights.append(trainer.model.flat_parameters().tobytes())
    assert weights[0] == weights[1]


DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numba, numpy as np, fastbp
    from fastbp.kernels import cpu, narrow
    rng = np.random.default_rng(0)
    # Large enough that the hidden layers' products take their parallel (prange) path: batch * n_in * n_out
    # >= PARALLEL_MIN_WORK for both, and wider than narrow.NARROW_MAX_WIDTH (the serial fused narrow kernel is
    # not it). Checked, so a change of either threshold cannot quietly test serial code.
    X = rng.normal(size=(512, 128)).astype(np.float32)
    y = rng.integers(0, 10, size=512)
    assert min(128 * 128 * 192, 128 * 192 * 96) >= cpu.PARALLEL_MIN_WORK and 96 > narrow.NARROW_MAX_WIDTH
    out = {"threads": numba.get_num_threads()}
    for optimizer in ("sgd", "adam"):
        model = fastbp.MLP([128, 192, 96, 10], "relu", seed=0)
        trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer, lr=0.01,
                                 momentum=0.9 if optimizer == "sgd" else 0.0, batch_size=128, seed=0)
        trainer.fit(X, y, epochs=3)
        loss, dw, db = trainer.loss_and_grads(X, y)
        digest = hashlib.sha256(model.flat_parameters().tobytes() + trainer.predict(X).tobytes()
                                + b"".join(g.tobytes() for g in dw + db)).hexdigest()
        out[optimizer] = digest
    out["layer"] = numba.threading_layer()
    print(json.dumps(out))
""")


def run_python(code, env_extra, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tbb_expected() -> bool:
    """True where fastbp's dependencies bring TBB (pyproject.toml: Linux x86-64), so numba must pick it."""
    import importlib.metadata
    import platform

    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return sys.platform.startswith("linux") and platform.machine() == "x86_64"


def test_weights_identical_across_thread_counts_and_layers():
    """Each output element is reduced in a fixed order by one thread, so 1 and 2 threads agree bit for bit, and
    so do the tbb and omp layers (the tasks are fastbp's, whichever layer runs them)."""
    one = run_python(DETERMINISM_SCRIPT, {"NUMBA_NUM_THREADS": "1", "NUMBA_THREADING_LAYER": "default"})
    two = run_python(DETERMINISM_SCRIPT, {"NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "default"})
    two_omp = run_python(DETERMINISM_SCRIPT, {"NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "omp"})
    assert one["threads"] == 1 and two["threads"] == 2 and two_omp["threads"] == 2
    assert two_omp["layer"] == "omp"  # the user's choice of layer is kept: fastbp loads no TBB over it
    if tbb_expected():
        assert two["layer"] == "tbb"
    assert one["sgd"] == two["sgd"] == two_omp["sgd"] and one["adam"] == two["adam"] == two_omp["adam"]


FORK_SCRIPT = textwrap.dedent("""
    import json, multiprocessing
    import numba, numpy as np, fastbp
    from fastbp.kernels import cpu
    X = np.random.default_rng(0).normal(size=(2048, 64)).astype(np.float32)
    assert 2048 * 64 * 128 >= cpu.PARALLEL_MIN_WORK  # predict runs a parallel region in both processes
    trainer = fastbp.Trainer(fastbp.MLP([64, 128, 10], "relu", seed=0), loss="softmax_cross_entropy")

    def child_predict(_):
        return trainer.predict(X).tobytes().hex()

    parent = trainer.predict(X).tobytes().hex()  # the threading layer is running before the fork
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map_async(child_predict, range(2)).get(timeout=120)
    print(json.dumps({"layer": numba.threading_layer(), "same": children == [parent, parent]}))
""")


@pytest.mark.skipif(not tbb_expected(), reason="TBB is fastbp's layer only where its dependencies bring it")
def test_forked_children_run_parallel_code():
    """Under GNU OpenMP a process forked after a parallel region aborts ("fork() called from a process already
    using GNU OpenMP, this is unsafe"): with the TBB layer, multiprocessing's fork start method works."""
    out = run_python(FORK_SCRIPT, {"NUMBA_THREADING_LAYER": "default"})
    assert out["layer"] == "tbb" and out["same"]


# -- several Python threads ------------------------------------------------------------------------------------------
THREADS_SCRIPT = textwrap.dedent("""
    import json, threading
    import numba, numpy as np, fastbp
    from fastbp import _threads
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=512)

    def train(seed, results, key):
        trainer = fastbp.Trainer(fastbp.MLP([64, 128, 10], "relu", seed=seed), loss="softmax_cross_entropy",
                                 optimizer="adam", lr=0.01, batch_size=64, seed=seed)
        trainer.fit(X, y, epochs=EPOCHS)
        results[key] = trainer.model.flat_parameters().tobytes().hex()

    sequential, concurrent = {}, {}
    for seed in (0, 1):
        train(seed, sequential, seed)
    threads = [threading.Thread(target=train, args=(seed, concurrent, seed)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"numba_layer": numba.threading_layer(), "fastbp_layer": _threads.threading_layer(),
                      "serialised": _threads.serialised(), "same": sequential == concurrent,
                      "both": sorted(concurrent) == [0, 1]}))
""")


def test_two_trainers_in_two_threads_default_layer():
    """numba picks a thread-safe layer (tbb or omp) here; both threads train at once, results unchanged."""
    env = {"NUMBA_THREADING_LAYER": "default"}  # whatever the machine running the tests may have set
    out = run_python(THREADS_SCRIPT.replace("EPOCHS", "8"), env)
    assert out["fastbp_layer"] == out["numba_layer"]
    # Where fastbp's dependencies bring TBB numba picks it (fastbp._threads); elsewhere omp where an OpenMP
    # runtime loads; only without either would it fall back to workqueue, and then fastbp serialises its calls.
    assert out["numba_layer"] in ("omp", "tbb", "workqueue")
    if tbb_expected():
        assert out["numba_layer"] == "tbb"
    assert out["serialised"] is (out["numba_layer"] == "workqueue")
    assert out["both"] and out["same"]


def test_two_trainers_in_two_threads_under_workqueue_do_not_abort():
    """numba's workqueue layer aborts the process on concurrent use; fastbp then takes turns (a lock)."""
    out = run_python(THREADS_SCRIPT.replace("EPOCHS", "8"), {"NUMBA_THREADING_LAYER": "workqueue"})
    assert out["numba_layer"] == "workqueue" and out["fastbp_layer"] == "workqueue"
    assert out["serialised"] is True
    assert out["both"] and out["same"]


def test_two_trainers_in_two_threads_in_process():
    X, y = problem(n=300, n_in=32)
    results, errors = {}, []

    def train(seed):
        try:
            trainer = fastbp.Trainer(fastbp.MLP([32, 64, 3], "relu", seed=seed), loss="softmax_cross_entropy",
                                     lr=0.05, batch_size=32, seed=seed)
            trainer.fit(X, y, epochs=5, validation_data=(X, y))
            results[seed] = (trainer.model.flat_parameters().tobytes(), trainer.history.val_loss)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (0, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in (0, 1, 2):
        trainer = fastbp.Trainer(fastbp.MLP([32, 64, 3], "relu", seed=seed), loss="softmax_cross_entropy",
                                 lr=0.05, batch_size=32, seed=seed)
        trainer.fit(X, y, epochs=5, validation_data=(X, y))
        assert results[seed] == (trainer.model.flat_parameters().tobytes(), trainer.history.val_loss)
