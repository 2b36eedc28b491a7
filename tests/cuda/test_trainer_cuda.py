"""Trainer(device="cuda") against Trainer(device="cpu") from the same initial weights and seed (the same
mini-batch orders): losses, gradients and weights after a few epochs; on a GPU or in the simulator.

Tolerance: float32 results agree to rtol 1e-5 (atol 1e-6) in the simulator. The CPU's products sum in
vectorised partial sums (fastmath reassociation), the CUDA kernels in plain order, so the two differ by
rounding only; one step's gradients and SGD runs stay within 1e-5. Adam is the exception: its update
m / sqrt(v) normalises each gradient, so where a gradient is near 0 an ulp-level difference becomes a
visible one; after two epochs the measured gap is up to 9.7e-5 relative, and Adam runs get rtol 2e-4.
On a GPU, fastmath (approximate exp/log/division, FMA) and a few epochs amplifying it are allowed rtol 1e-4
(2e-4 for Adam). float64: 1e-10 / 1e-12 everywhere.
"""
import numpy as np
import pytest

import fastbp

from .. import naive
from ..test_trainer import make_problem
from .conftest import SIMULATOR, SKIP_REASON, cuda_reason

pytestmark = pytest.mark.skipif(cuda_reason() is not None, reason=SKIP_REASON)

PARITY = {np.float32: dict(rtol=1e-5, atol=1e-6) if SIMULATOR else dict(rtol=1e-4, atol=1e-5),
          np.float64: dict(rtol=1e-10, atol=1e-12)}
# Adam amplifies rounding differences between the targets (see the module docstring).
ADAM_PARITY = {np.float32: dict(rtol=2e-4, atol=1e-5), np.float64: PARITY[np.float64]}


def pair(sizes, act, dtype, **trainer_kwargs):
    """A CPU trainer and a CUDA trainer on two copies of one model."""
    model = fastbp.MLP(sizes, act, dtype=dtype, seed=1)
    return [fastbp.Trainer(m, device=device, seed=7, **trainer_kwargs)
            for m, device in ((model, "cpu"), (model.copy(), "cuda"))]


def assert_same_params(cpu_model, cuda_model, tol):
    for a, b in zip(cpu_model.weights + cpu_model.biases, cuda_model.weights + cuda_model.biases):
        np.testing.assert_allclose(b, a, **tol)


@pytest.mark.parametrize("loss,optimizer,kwargs,batch_size", [
    ("softmax_cross_entropy", "sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01), 8),
    ("binary_cross_entropy", "adam", dict(weight_decay=0.01), 6),
    ("softmax_cross_entropy", "adamw", dict(weight_decay=0.05), 8),
    # clipped: the GPU trains step by step and clips on the host (the bound is below every step's norm here)
    ("softmax_cross_entropy", "sgd", dict(momentum=0.9, weight_decay=0.01, clip_grad_norm=0.05), 8),
    ("mse", "adam", dict(clip_grad_norm=0.05), None),
    ("mse", "sgd", dict(momentum=0.5, dampening=0.1), None),
    ("poisson", "sgd", dict(momentum=0.9), 8),
])
def test_fit_matches_cpu_step_for_step(small_launches, loss, optimizer, kwargs, batch_size, rng):
    dtype = np.float32
    X, y, _ = make_problem(loss, 21, [5, 7, 3], rng, dtype)
    cpu, gpu = pair([5, 7, 6, 3], "tanh", dtype, loss=loss, optimizer=optimizer, lr=0.1,
                    batch_size=batch_size, **kwargs)
    h_cpu, h_gpu = cpu.fit(X, y, epochs=2), gpu.fit(X, y, epochs=2)
    tol = (ADAM_PARITY if optimizer.startswith("adam") else PARITY)[dtype]
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **tol)
    assert gpu.steps_done == cpu.steps_done
    np.testing.assert_allclose(gpu.opt_state, cpu.opt_state, **tol)
    assert_same_params(cpu.model, gpu.model, tol)
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), **tol)
    scores = gpu.evaluate(X, y)
    for key, value in cpu.evaluate(X, y).items():
        assert scores[key] == pytest.approx(value, rel=tol["rtol"])
    if "clip_grad_norm" in kwargs:  # the bound did clip: without it the CPU ends elsewhere
        unclipped = dict(kwargs, clip_grad_norm=None)
        plain, _ = pair([5, 7, 6, 3], "tanh", dtype, loss=loss, optimizer=optimizer, lr=0.1,
                        batch_size=batch_size, **unclipped)
        plain.fit(X, y, epochs=2)
        assert np.abs(plain.model.weights[0] - gpu.model.weights[0]).max() > 1e-3


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"])
def test_loss_and_grads_match_cpu_and_reference(small_launches, loss, dtype, rng):
    sizes = [4, 6, 3]
    X, y, Y = make_problem(loss, 13, sizes, rng, dtype)
    cpu, gpu = pair(sizes, "sigmoid", dtype, loss=loss)
    value, dweights, dbiases = gpu.loss_and_grads(X, y)
    value_cpu, dweights_cpu, dbiases_cpu = cpu.loss_and_grads(X, y)
    assert value == pytest.approx(value_cpu, rel=PARITY[dtype]["rtol"])
    for a, b in zip(dweights_cpu + dbiases_cpu, dweights + dbiases):
        np.testing.assert_allclose(b, a, **PARITY[dtype])
    ref_value, ref_dw, _ = naive.loss_and_grads(gpu.model.weights, gpu.model.biases, gpu.model.activations,
                                                loss, X, Y)
    assert value == pytest.approx(ref_value, rel=1e-5 if dtype == np.float32 else 1e-10)
    np.testing.assert_allclose(dweights[0], ref_dw[0], rtol=2e-4 if dtype == np.float32 else 1e-9,
                               atol=2e-5 if dtype == np.float32 else 1e-12)


def test_fit_float64_with_validation_matches_cpu(small_launches, rng):
    X, y, _ = make_problem("softmax_cross_entropy", 17, [3, 5, 4], rng, np.float64)
    Xv, yv, _ = make_problem("softmax_cross_entropy", 9, [3, 5, 4], rng, np.float64)
    cpu, gpu = pair([3, 5, 4], "relu", np.float64, loss="softmax_cross_entropy", optimizer="adam", lr=0.05,
                    batch_size=5)
    h_cpu = cpu.fit(X, y, epochs=2, validation_data=(Xv, yv))
    h_gpu = gpu.fit(X, y, epochs=2, validation_data=(Xv, yv))
    tol = PARITY[np.float64]
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **tol)
    np.testing.assert_allclose(h_gpu.val_loss, h_cpu.val_loss, **tol)
    assert h_gpu.val_accuracy == h_cpu.val_accuracy
    assert_same_params(cpu.model, gpu.model, tol)


def test_device_arrays_are_used_in_place(small_launches, rng):
    kernels = small_launches
    X, y, _ = make_problem("binary_cross_entropy", 12, [3, 4, 2], rng, np.float32)
    cpu, gpu = pair([3, 4, 2], "relu", np.float32, loss="binary_cross_entropy", lr=0.5, batch_size=5)
    X_dev, y_dev = kernels.to_device(X), kernels.to_device(y)
    assert gpu._inputs(X_dev) is X_dev  # no copy, no conversion
    h_cpu, h_gpu = cpu.fit(X, y, epochs=2), gpu.fit(X_dev, y_dev, epochs=2)
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **PARITY[np.float32])
    np.testing.assert_allclose(gpu.predict(X_dev), cpu.predict(X), **PARITY[np.float32])
    assert gpu.evaluate(X_dev, y_dev)["accuracy"] == cpu.evaluate(X, y)["accuracy"]


def test_device_arrays_are_checked_on_the_device(small_launches, rng):
    kernels = small_launches
    gpu = fastbp.Trainer(fastbp.MLP([3, 2], seed=0), loss="binary_cross_entropy", device="cuda")
    X = rng.normal(size=(6, 3)).astype(np.float32)
    y = rng.uniform(size=(6, 2)).astype(np.float32)
    with pytest.raises(TypeError, match="dtype float64"):
        gpu.fit(kernels.to_device(X.astype(np.float64)), y)
    with pytest.raises(ValueError, match="3 columns"):
        gpu.fit(kernels.to_device(X[:, :2].copy()), y)
    bad = X.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        gpu.fit(kernels.to_device(bad), y)
    with pytest.raises(ValueError, match=r"lie in \[0.0, 1.0\]"):
        gpu.fit(X, kernels.to_device(y + 1))
    with pytest.raises(TypeError, match="CPU device needs a host array"):
        fastbp.Trainer(fastbp.MLP([3, 2], seed=0), loss="mse").fit(kernels.to_device(X), y)


@pytest.mark.filterwarnings("ignore:.*encountered in scalar:RuntimeWarning")
def test_nonfinite_epoch_restores_the_epoch_start(small_launches, rng):
    X = (rng.normal(size=(12, 2)) * 10).astype(np.float32)
    y = (rng.normal(size=(12, 1)) * 100).astype(np.float32)
    cpu, gpu = pair([2, 4, 1], "relu", np.float32, loss="mse", lr=10.0, batch_size=None)
    for trainer in (cpu, gpu):
        with pytest.raises(fastbp.NonFiniteLossError):
            trainer.fit(X, y, epochs=30)
    assert len(gpu.history.loss) == len(cpu.history.loss)
    assert all(np.isfinite(w).all() for w in gpu.model.weights)
    assert_same_params(cpu.model, gpu.model, PARITY[np.float32])


def test_target_loss_and_auto_device(small_launches):
    X = np.linspace(-1, 1, 16).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, 4, 1], "tanh", dtype=np.float64, seed=0), loss="mse", lr=0.3,
                             batch_size=None, device="auto")
    assert trainer.device == "cuda"  # the simulator or a GPU counts as usable
    history = trainer.fit(X, 0.5 * X, epochs=200, target_loss=5e-3)
    assert history.stop_reason == "target_loss"
    assert history.loss[-1] <= 5e-3 < history.loss[-2]


def _weights(n, rng, zero_rows=()):
    w = rng.uniform(0.0, 3.0, size=n)
    w[::4] = 0.0  # zero weights are allowed
    w[list(zero_rows)] = 0.0
    return w


# Weighted fits on the GPU take the per-step launches (the fused kernel has no per-row weights) and, clipped,
# the host's step-by-step loop: each against the CPU's weighted train_epochs from the same orders.
@pytest.mark.parametrize("sizes,loss,optimizer,kwargs,batch_size", [
    ([5, 7, 3], "softmax_cross_entropy", "sgd", dict(momentum=0.9), 6),  # one hidden layer
    ([5, 7, 6, 3], "binary_cross_entropy", "adam", dict(weight_decay=0.01), 8),  # two
    ([5, 9, 7, 6, 3], "mse", "sgd", dict(nesterov=True, momentum=0.5), 5),  # three
    ([5, 7, 6, 3], "mse", "adamw", dict(weight_decay=0.05), None),  # full batch, in order
    ([5, 7, 6, 3], "softmax_cross_entropy", "sgd", dict(momentum=0.9, clip_grad_norm=0.05), 8),  # stepwise
    ([5, 7, 3], "poisson", "sgd", dict(momentum=0.5), 6),
])
def test_weighted_fit_matches_cpu(small_launches, sizes, loss, optimizer, kwargs, batch_size, rng):
    dtype = np.float32
    X, y, _ = make_problem(loss, 23, sizes, rng, dtype)
    w = _weights(23, rng)
    cpu, gpu = pair(sizes, "tanh", dtype, loss=loss, optimizer=optimizer, lr=0.1, batch_size=batch_size, **kwargs)
    h_cpu, h_gpu = cpu.fit(X, y, epochs=2, sample_weight=w), gpu.fit(X, y, epochs=2, sample_weight=w)
    tol = (ADAM_PARITY if optimizer.startswith("adam") else PARITY)[dtype]
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **tol)
    assert gpu.steps_done == cpu.steps_done
    np.testing.assert_allclose(gpu.opt_state, cpu.opt_state, **tol)
    assert_same_params(cpu.model, gpu.model, tol)
    # The weights did matter: the unweighted fit ends elsewhere.
    plain, _ = pair(sizes, "tanh", dtype, loss=loss, optimizer=optimizer, lr=0.1, batch_size=batch_size, **kwargs)
    plain.fit(X, y, epochs=2)
    assert np.abs(plain.model.weights[0] - gpu.model.weights[0]).max() > 1e-3


def test_weighted_fit_with_a_batch_that_weighs_nothing(small_launches, rng):
    """Epoch 0's second batch holds only zero weights: a zero gradient, and the optimizer still steps (its
    momentum moves the weights), on both devices; float64 so that the comparison is tight."""
    dtype = np.float64
    X, y, _ = make_problem("mse", 20, [4, 6, 2], rng, dtype)
    order = np.random.default_rng(7).permutation(20)  # the seeded Trainer's first epoch order
    w = _weights(20, rng, zero_rows=order[5:10])
    cpu, gpu = pair([4, 6, 2], "sigmoid", dtype, loss="mse", lr=0.2, momentum=0.9, batch_size=5)
    h_cpu, h_gpu = cpu.fit(X, y, epochs=2, sample_weight=w), gpu.fit(X, y, epochs=2, sample_weight=w)
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **PARITY[dtype])
    assert gpu.steps_done == cpu.steps_done == 8
    assert_same_params(cpu.model, gpu.model, PARITY[dtype])


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"])
def test_weighted_evaluate_and_loss_and_grads_match_cpu(small_launches, monkeypatch, loss, dtype, rng):
    from fastbp.backends import cuda as backend_module

    monkeypatch.setattr(backend_module, "EVAL_CAPACITY", 4)  # 11 rows: chunks of 4, 4, 3, each weighted
    sizes = [4, 6, 3]
    X, y, _ = make_problem(loss, 11, sizes, rng, dtype)
    w = _weights(11, rng)
    cpu, gpu = pair(sizes, "relu", dtype, loss=loss)
    scores, scores_cpu = gpu.evaluate(X, y, sample_weight=w), cpu.evaluate(X, y, sample_weight=w)
    assert scores.keys() == scores_cpu.keys()
    for key, value in scores_cpu.items():
        assert scores[key] == pytest.approx(value, rel=PARITY[dtype]["rtol"])
    assert scores["loss"] != pytest.approx(gpu.evaluate(X, y)["loss"], rel=1e-3)  # the weights count
    value, dweights, dbiases = gpu.loss_and_grads(X, y, sample_weight=w)
    value_cpu, dweights_cpu, dbiases_cpu = cpu.loss_and_grads(X, y, sample_weight=w)
    assert value == pytest.approx(value_cpu, rel=PARITY[dtype]["rtol"])
    for a, b in zip(dweights + dbiases, dweights_cpu + dbiases_cpu):
        np.testing.assert_allclose(a, b, **PARITY[dtype])


def test_step_schedule_weighted_divisors():
    """SF_INV per step: 1 / (the batch's weight sum * one row's divisor), 0 for a batch that weighs nothing,
    formed over each epoch's own order (an independent sum here, batch by batch)."""
    from fastbp.kernels import cuda_step as step
    from fastbp.kernels.pointwise import MSE

    layout = fastbp.MLP([3, 4, 2]).layout
    n, k, batch = 7, 2, 3
    w = np.array([1.0, 0.0, 2.0, 0.0, 0.0, 0.5, 4.0])
    orders = np.array([[0, 1, 2, 3, 4, 5, 6], [1, 3, 4, 6, 0, 2, 5]])
    _, sched = step.step_schedule(layout, MSE, step.SGD, np.zeros(16), [0.1, 0.1], n, k, batch, 0, [-1, -1],
                                  np.float64, w, orders)
    expected = []
    for order in orders:
        for start in range(0, n, batch):
            total = w[order[start:start + batch]].sum() * k  # mse: a row's divisor is its k outputs
            expected.append(0.0 if total == 0 else 1.0 / total)
    np.testing.assert_allclose(sched[:, step.SF_INV], expected, rtol=1e-15)
    assert sched[3, step.SF_INV] == 0.0  # epoch 1's first batch (rows 1, 3, 4) weighs nothing
    _, plain = step.step_schedule(layout, MSE, step.SGD, np.zeros(16), [0.1, 0.1], n, k, batch, 0, [-1, -1],
                                  np.float64)
    np.testing.assert_allclose(plain[:, step.SF_INV], np.tile([1 / 6, 1 / 6, 1 / 2], 2), rtol=1e-15)


@pytest.mark.parametrize("fused, weighted", [(True, False), (False, False), (False, True)],
                         ids=["fused", "step-launches", "weighted"])
def test_unshuffled_fit_matches_cpu(small_launches, fused, weighted, rng):
    """fit(shuffle=False): batches in row order on both devices (the in-order schedule with several batches)."""
    dtype = np.float32
    X, y, _ = make_problem("softmax_cross_entropy", 21, [5, 7, 3], rng, dtype)
    w = rng.uniform(0.5, 2.0, 21) if weighted else None
    cpu, gpu = pair([5, 7, 6, 3], "tanh", dtype, loss="softmax_cross_entropy", lr=0.1, batch_size=8, momentum=0.9)
    gpu._backend.use_fused = fused
    h_cpu = cpu.fit(X, y, epochs=2, shuffle=False, sample_weight=w)
    h_gpu = gpu.fit(X, y, epochs=2, shuffle=False, sample_weight=w)
    np.testing.assert_allclose(h_gpu.loss, h_cpu.loss, **PARITY[dtype])
    assert_same_params(cpu.model, gpu.model, PARITY[dtype])
    shuffled, _ = pair([5, 7, 6, 3], "tanh", dtype, loss="softmax_cross_entropy", lr=0.1, batch_size=8, momentum=0.9)
    shuffled.fit(X, y, epochs=2, sample_weight=w)  # the order mattered: a shuffled fit ends elsewhere
    assert np.abs(shuffled.model.weights[0] - gpu.model.weights[0]).max() > 1e-4
