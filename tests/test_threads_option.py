"""Trainer(n_threads=...): each compiled call runs on that many threads, the caller's setting survives every
call (also one that raises), the results do not depend on it, and bad values change nothing. Also
Trainer.__repr__."""
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

import fastbp
import fastbp._threads
from fastbp.backends import cpu as cpu_backend

LIMIT = numba.config.NUMBA_NUM_THREADS
needs_two = pytest.mark.skipif(LIMIT < 2, reason="numba runs with fewer than 2 threads here")


@pytest.fixture
def caller_threads():
    """The caller's count set to the most numba allows (so that n_threads=1 differs from it), then put back."""
    before = numba.get_num_threads()
    numba.set_num_threads(LIMIT)
    yield LIMIT
    numba.set_num_threads(before)


def classification(n, n_in, k, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in)).astype(np.float32)
    return X, rng.integers(0, k, size=n)


def spy_on(monkeypatch, name, seen, fail=False):
    """Replace the CPU driver ``name`` as the backend calls it (fastbp.backends.cpu._train_epochs, ...: the
    kernel behind an Entry) by one that records numba's thread count."""
    original = getattr(cpu_backend, "_" + name)

    def spy(*args):
        seen.append((name, numba.get_num_threads()))
        if fail:
            raise RuntimeError("kernel failed")
        return original(*args)

    monkeypatch.setattr(cpu_backend, "_" + name, spy)


@needs_two
def test_compiled_calls_run_on_n_threads_and_the_callers_count_is_restored(caller_threads, monkeypatch):
    X, y = classification(300, 200, 5)  # 200 wide: the general path (kernels.cpu), not the narrow kernel
    trainer = fastbp.Trainer(fastbp.MLP([200, 160, 5], seed=0), loss="softmax_cross_entropy", seed=0,
                             n_threads=1)
    seen, in_callbacks = [], []
    for name in ("train_epochs", "predict", "loss", "predict_and_loss", "dataset_grads"):
        spy_on(monkeypatch, name, seen)
    trainer.fit(X, y, epochs=2, validation_data=(X, y),
                callbacks=[lambda t, h: in_callbacks.append(numba.get_num_threads())])
    assert numba.get_num_threads() == caller_threads
    trainer.predict(X)
    assert numba.get_num_threads() == caller_threads
    trainer.evaluate(X, y)
    assert numba.get_num_threads() == caller_threads
    trainer.loss_and_grads(X, y)
    assert numba.get_num_threads() == caller_threads
    assert {name for name, _ in seen} == {"train_epochs", "predict_and_loss", "predict", "dataset_grads"}
    assert all(count == 1 for _, count in seen), seen
    assert in_callbacks == [caller_threads] * 2  # callbacks run between the compiled calls, on the caller's count


@needs_two
def test_none_leaves_numbas_setting(caller_threads, monkeypatch):
    X, y = classification(64, 200, 3)
    trainer = fastbp.Trainer(fastbp.MLP([200, 140, 3], seed=0), loss="softmax_cross_entropy", seed=0)
    assert trainer.n_threads is None
    seen = []
    spy_on(monkeypatch, "train_epochs", seen)
    numba.set_num_threads(1)
    trainer.fit(X, y, epochs=1)
    assert seen == [("train_epochs", 1)] and numba.get_num_threads() == 1


@needs_two
def test_the_callers_count_is_restored_after_exceptions(caller_threads, monkeypatch):
    X, y = classification(64, 8, 3)
    trainer = fastbp.Trainer(fastbp.MLP([8, 16, 3], seed=0), loss="softmax_cross_entropy", seed=0, n_threads=1)

    def failing_callback(trainer, history):
        raise KeyError("callback failed")

    with pytest.raises(KeyError, match="callback failed"):
        trainer.fit(X, y, epochs=3, callbacks=[failing_callback])
    assert numba.get_num_threads() == caller_threads
    seen = []
    spy_on(monkeypatch, "predict", seen, fail=True)  # an exception inside the guarded call itself
    with pytest.raises(RuntimeError, match="kernel failed"):
        trainer.predict(X)
    assert seen == [("predict", 1)] and numba.get_num_threads() == caller_threads


def train(sizes, n, batch_size, n_threads, epochs=3):
    X, y = classification(n, sizes[0], sizes[-1], seed=1)
    trainer = fastbp.Trainer(fastbp.MLP(sizes, "relu", seed=0), loss="softmax_cross_entropy", optimizer="adam",
                             lr=1e-3, batch_size=batch_size, seed=0, n_threads=n_threads)
    history = trainer.fit(X, y, epochs=epochs)
    return trainer, history, trainer.predict(X)


@needs_two
@pytest.mark.parametrize("sizes,n,batch_size", [([256, 512, 256, 10], 768, 256),  # the parallel kernels
                                                ([12, 32, 32, 4], 500, 32)],  # the narrow fused kernel
                         ids=["mid-size", "narrow"])
def test_results_are_bit_identical_for_one_and_two_threads(sizes, n, batch_size, caller_threads):
    one, history_one, out_one = train(sizes, n, batch_size, 1)
    two, history_two, out_two = train(sizes, n, batch_size, 2)
    assert history_one.loss == history_two.loss
    for a, b in zip(one.model.weights + one.model.biases, two.model.weights + two.model.biases):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out_one, out_two)
    np.testing.assert_array_equal(one.opt_state, two.opt_state)
    assert numba.get_num_threads() == caller_threads


class FakeClock:
    """time.monotonic and time.process_time for CoreShare, set by hand."""

    def __init__(self):
        self.wall, self.cpu = 100.0, 0.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.cpu


def write_stat(path, busy_seconds, nice_seconds=(0, 0, 0)):
    """A /proc/stat whose per-CPU lines show ``busy_seconds`` (per CPU) of user time, ``nice_seconds`` of niced
    processes' time and 1000 s idle."""
    hz = os.sysconf("SC_CLK_TCK")
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    lines += [f"cpu{i} {round(b * hz)} {round(n * hz)} 0 {1000 * hz} 0 0 0 0 0 0"
              for i, (b, n) in enumerate(zip(busy_seconds, nice_seconds))]
    path.write_text("\n".join(lines + ["intr 5 1 2 3", "ctxt 7"]) + "\n")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks on this platform")
def test_core_share_counts_the_busy_time_of_other_processes(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(fastbp._threads, "time", clock)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    stat = tmp_path / "stat"
    write_stat(stat, [0, 0, 0])
    share = fastbp._threads.CoreShare(interval=0.05, stat_path=str(stat))
    assert share.free() == 2  # the first sample: nothing to compare with yet
    # one second: both CPUs busy, this process used one CPU-second, cpu2 (not ours) busy too
    clock.wall, clock.cpu = 101.0, 1.0
    write_stat(stat, [1.0, 1.0, 1.0])
    assert share.free() == 1
    assert share.others() == pytest.approx(1.0)
    clock.wall += 0.01  # within the interval: the last estimate, whatever the file says now
    write_stat(stat, [1.0, 1.0, 5.0])
    assert share.free() == 1
    # the next second: all the busy time was this process's
    clock.wall, clock.cpu = 102.0, 3.0
    write_stat(stat, [2.0, 2.0, 9.0])
    assert share.free() == 2 and share.others() == pytest.approx(0.0)
    clock.wall += 1.0  # a third of a core used by others rounds to no core
    write_stat(stat, [2.2, 2.1, 9.0])
    assert share.free() == 2 and share.others() == pytest.approx(0.3)
    clock.wall += 1.0  # a niced process's core: it yields to this (un-niced) one, so it is not left out
    write_stat(stat, [2.2, 2.1, 9.0], nice_seconds=[1.0, 0, 0])
    assert share.free() == 2 and share.others() == pytest.approx(0.0)
    monkeypatch.setattr(os, "getpriority", lambda which, who: 10)  # unless this process is niced too
    niced = fastbp._threads.CoreShare(interval=0.05, stat_path=str(stat))
    assert niced.free() == 2
    clock.wall += 1.0
    write_stat(stat, [2.2, 2.1, 9.0], nice_seconds=[2.0, 0, 0])
    assert niced.free() == 1 and niced.others() == pytest.approx(1.0)
    stat.unlink()  # nothing to read (not Linux, or no /proc): no limit
    clock.wall += 1.0
    assert share.free() >= 1 << 20


@needs_two
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="CoreShare reads /proc/stat (Linux)")
def test_a_busy_core_takes_a_thread_away_and_changes_no_result(caller_threads, monkeypatch):
    """With another process spinning on one of this process's CPUs, a trainer with n_threads=None runs its
    compiled calls on fewer threads than numba's count, and trains exactly as on all of them; n_threads=n
    still runs on n."""
    share = fastbp._threads.CoreShare(interval=0.2)
    monkeypatch.setattr(fastbp._threads, "core_share", share)
    seen = []
    spy_on(monkeypatch, "train_epochs", seen)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        share.free()  # a first sample
        time.sleep(0.5)  # the spinner keeps a core busy meanwhile
        adaptive, history_adaptive, out_adaptive = train([256, 512, 256, 10], 768, 256, None, epochs=1)
        pinned = fastbp.Trainer(fastbp.MLP([256, 16, 3], seed=0), loss="softmax_cross_entropy", n_threads=2)
        pinned.fit(*classification(64, 256, 3), epochs=1)
    finally:
        spinner.kill()
        spinner.wait()
    assert seen[0][1] < caller_threads and seen[1][1] == 2, seen
    full, history_full, out_full = train([256, 512, 256, 10], 768, 256, caller_threads, epochs=1)
    assert history_adaptive.loss == history_full.loss
    for a, b in zip(adaptive.model.weights + adaptive.model.biases, full.model.weights + full.model.biases):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out_adaptive, out_full)
    assert numba.get_num_threads() == caller_threads


BAD_VALUES = [(0, ValueError, r"n_threads must be >= 1; got 0"),
              (-1, ValueError, r"n_threads must be >= 1; got -1"),
              (2.5, TypeError, r"n_threads must be an integer; got float 2.5"),
              ("2", TypeError, r"n_threads must be an integer; got str '2'"),
              (True, TypeError, r"n_threads must be an integer; got bool"),
              (LIMIT + 1, ValueError, rf"n_threads must be <= numba.config.NUMBA_NUM_THREADS \({LIMIT}: .*got "
                                      rf"{LIMIT + 1}")]


@pytest.mark.parametrize("value,error,message", BAD_VALUES, ids=repr)
def test_bad_values_are_rejected_and_change_nothing(value, error, message):
    model = fastbp.MLP([3, 4, 1], seed=0)
    weights = [w.copy() for w in model.weights]
    with pytest.raises(error, match=message):
        fastbp.Trainer(model, loss="mse", n_threads=value)
    for w, before in zip(model.weights, weights):
        np.testing.assert_array_equal(w, before)
    trainer = fastbp.Trainer(model, loss="mse", n_threads=1)
    with pytest.raises(error, match=message):
        trainer.n_threads = value
    assert trainer.n_threads == 1 and trainer._backend.n_threads == 1
    trainer.n_threads = None
    assert trainer.n_threads is None


def test_n_threads_is_a_stored_setting(tmp_path):
    X, y = classification(40, 3, 2)
    trainer = fastbp.Trainer(fastbp.MLP([3, 5, 2], seed=0), loss="softmax_cross_entropy", seed=0, n_threads=1)
    trainer.fit(X, y, epochs=1)
    state = trainer.state_dict()
    assert state["trainer"]["n_threads"] == 1
    trainer.save(tmp_path / "t.npz")
    assert fastbp.Trainer.load(tmp_path / "t.npz").n_threads == 1
    assert fastbp.Trainer.from_state_dict(state).n_threads == 1
    # A state from before n_threads existed: None (numba's setting).
    old = state | {"trainer": {k: v for k, v in state["trainer"].items() if k != "n_threads"}}
    assert fastbp.Trainer.from_state_dict(old).n_threads is None
    # load_state_dict keeps this trainer's own n_threads, like its other settings.
    other = fastbp.Trainer(fastbp.MLP([3, 5, 2], seed=1), loss="softmax_cross_entropy")
    other.load_state_dict(state)
    assert other.n_threads is None
    # choose_learning_rate's trial trainers inherit it.
    assert trainer._clone(0.1).n_threads == 1


# -- repr -------------------------------------------------------------------------------------------------------
def test_repr_shows_the_model_the_rate_and_the_settings_that_differ_from_the_defaults():
    trainer = fastbp.Trainer(fastbp.MLP([2, 16, 1], activation="relu"), loss="mse", optimizer="adam", lr=0.001,
                             n_threads=1)
    assert repr(trainer) == ("Trainer(MLP([2, 16, 1], activation='relu'), loss='mse', optimizer='adam', lr=0.001, "
                             "batch_size=32, n_threads=1)")
    trainer = fastbp.Trainer(fastbp.MLP([4, 8, 8, 3], activation=["tanh", "relu"], dtype=np.float64),
                             loss="softmax_cross_entropy", lr=fastbp.CosineDecay(0.1, t_max=20, warmup_epochs=2),
                             momentum=0.9, nesterov=True, batch_size=None, seed=7)
    assert repr(trainer) == (
        "Trainer(MLP([4, 8, 8, 3], activation=['tanh', 'relu']), loss='softmax_cross_entropy', optimizer='sgd', "
        "lr=CosineDecay(initial_lr=0.1, t_max=20, eta_min=0.0, warmup_epochs=2), batch_size=None, dtype=float64, "
        "momentum=0.9, nesterov=True, seed=7)")
    trainer.lr_scale = 0.1
    assert ", lr_scale=0.1," in repr(trainer) and "\n" not in repr(trainer)
    # weight_decay is shown against the optimizer's own default (AdamW's is 0.01, torch's).
    model = fastbp.MLP([2, 3, 1])
    assert "weight_decay" not in repr(fastbp.Trainer(model, loss="mse", optimizer="adamw"))
    assert "weight_decay=0.0)" in repr(fastbp.Trainer(model, loss="mse", optimizer="adamw", weight_decay=0.0))
    assert "weight_decay=0.01)" in repr(fastbp.Trainer(model, loss="mse", optimizer="sgd", weight_decay=0.01))
