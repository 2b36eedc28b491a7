"""The Trainer end to end against the numpy reference, and the problems fastbp must learn."""
import numpy as np
import pytest

import fastbp

from . import naive
from .conftest import TOLERANCES

ACTS = ["sigmoid", "relu", "tanh", "identity", "leaky_relu"]
LOSSES = ["mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"]


def make_problem(loss, n, sizes, rng, dtype):
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    k = sizes[-1]
    if loss == "mse":
        y = rng.normal(size=(n, k)).astype(dtype)
        Y = y.astype(np.float64)
    elif loss == "binary_cross_entropy":
        y = rng.uniform(size=(n, k)).astype(dtype)
        Y = y.astype(np.float64)
    elif loss == "poisson":
        y = rng.poisson(1.5, size=(n, k)).astype(dtype)
        Y = y.astype(np.float64)
    else:
        y = rng.integers(0, k, size=n)
        Y = naive.one_hot(y, k)
    return X, y, Y


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("sizes,n", [([3, 5, 2], 1), ([7, 13, 11, 3], 29), ([1, 1, 2], 6), ([17, 31, 5], 67)])
def test_loss_and_grads_match_reference(sizes, n, act, loss, dtype, rng):
    model = fastbp.MLP(sizes, activation=act, dtype=dtype, seed=3)
    X, y, Y = make_problem(loss, n, sizes, rng, dtype)
    trainer = fastbp.Trainer(model, loss=loss)
    before = [w.copy() for w in model.weights]
    value, dweights, dbiases = trainer.loss_and_grads(X, y)
    ref_value, ref_dw, ref_db = naive.loss_and_grads(model.weights, model.biases, model.activations, loss, X, Y)
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(value, ref_value, **tol)
    for got, ref in zip(dweights + dbiases, ref_dw + ref_db):
        assert got.shape == ref.shape and got.dtype == dtype
        np.testing.assert_allclose(got, ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    for w, b in zip(model.weights, before):  # no update
        np.testing.assert_array_equal(w, b)


@pytest.mark.parametrize("loss", LOSSES)
def test_predict_and_evaluate_match_reference(loss, dtype, rng):
    model = fastbp.MLP([6, 9, 4], activation="tanh", dtype=dtype, seed=1)
    X, y, Y = make_problem(loss, 5000, model.sizes, rng, dtype)  # > one evaluation chunk
    trainer = fastbp.Trainer(model, loss=loss)
    Z, _ = naive.forward(model.weights, model.biases, model.activations, X)
    out = trainer.predict(X)
    assert out.shape == (5000, 4) and out.dtype == dtype
    np.testing.assert_allclose(out, naive.output_transform(loss, Z[-1]), **TOLERANCES[dtype])
    scores = trainer.evaluate(X, y)
    ref_loss, _ = naive.loss_and_dlogits(loss, Z[-1], Y)
    np.testing.assert_allclose(scores["loss"], ref_loss, rtol=1e-5 if dtype == np.float32 else 1e-10)
    if loss == "softmax_cross_entropy":
        assert scores["accuracy"] == pytest.approx(np.mean(Z[-1].argmax(1) == y))
    if loss in ("mse", "poisson"):
        assert "accuracy" not in scores


@pytest.mark.parametrize("loss", ["binary_cross_entropy", "softmax_cross_entropy"])
def test_a_classifiers_evaluate_is_one_forward_pass(loss, monkeypatch, rng):
    """Loss and accuracy come from one pass over the data (kernels.cpu.forward_pass with both an output and
    targets), bit for bit the separate predict and loss passes'."""
    from fastbp.backends import cpu as backend_module

    model = fastbp.MLP([6, 40, 4], activation="tanh", seed=1)
    X, y, Y = make_problem(loss, 5000, model.sizes, rng, np.float32)  # > one evaluation chunk
    trainer = fastbp.Trainer(model, loss=loss)
    backend, targets = trainer._backend, Y.astype(np.float32)
    predictions, loss_value = trainer.predict(X), backend.loss_value(X, targets)
    calls = []

    def counted(name):
        driver = getattr(backend_module, name)
        return lambda *args: calls.append(name) or driver(*args)

    for name in ("_predict", "_loss", "_predict_and_loss"):
        monkeypatch.setattr(backend_module, name, counted(name))
    scores = trainer.evaluate(X, y)
    assert calls == ["_predict_and_loss"] and scores["loss"] == loss_value
    out, both_loss = backend.predict_and_loss(X, targets, 4)
    np.testing.assert_array_equal(out, predictions)
    assert both_loss == loss_value


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
def test_central_differences_float64(act, loss, rng):
    """Every parameter of a whole network against (L(p + h) - L(p - h)) / 2h; relative error <= 1e-6."""
    model = fastbp.MLP([4, 6, 5, 3], activation=act, dtype=np.float64, seed=7)
    X, y, _ = make_problem(loss, 11, model.sizes, rng, np.float64)
    if act in ("relu", "leaky_relu"):
        # The difference quotient is only smooth if no hidden pre-activation lies near relu's kink.
        for _ in range(200):
            Z, _ = naive.forward(model.weights, model.biases, model.activations, X)
            if min(np.abs(z).min() for z in Z[:-1]) > 1e-2:
                break
            X = rng.normal(size=X.shape)
        else:
            pytest.fail("no sample found with every hidden pre-activation away from 0")
    trainer = fastbp.Trainer(model, loss=loss)
    _, dweights, dbiases = trainer.loss_and_grads(X, y)
    # Fourth-order central difference: truncation O(h^4), rounding ~1e-16 / h, both far below 1e-6.
    h = 1e-4
    def loss_at(p, idx, value):
        p[idx] = value
        return trainer.evaluate(X, y)["loss"]
    for params, grads in ((model.weights, dweights), (model.biases, dbiases)):
        for p, g in zip(params, grads):
            numeric = np.empty_like(p)
            for idx in np.ndindex(p.shape):
                saved = p[idx]
                f = [loss_at(p, idx, saved + step * h) for step in (2, 1, -1, -2)]
                p[idx] = saved
                numeric[idx] = (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * h)
            # Relative error; where both are ~0 (dead units) the quotient's own rounding (~1e-16 / h) is all
            # that is left, so the denominator is floored: |difference| <= 1e-11 there.
            err = np.abs(numeric - g) / np.maximum(1e-5, np.abs(numeric) + np.abs(g))
            assert err.max() <= 1e-6, (act, loss, err.max())


def test_worked_example_2_2_1_one_sgd_step():
    """A 2-2-1 sigmoid network, MSE, one full-batch SGD step, with the arithmetic written out."""
    model = fastbp.MLP([2, 2, 1], activation="sigmoid", dtype=np.float64, seed=0)
    model.weights[0][...] = [[0.1, 0.2], [0.3, 0.4]]
    model.biases[0][...] = [0.0, 0.0]
    model.weights[1][...] = [[0.5], [0.6]]
    model.biases[1][...] = [0.1]
    X = np.array([[1.0, 2.0]])
    y = np.array([[1.0]])
    # Forward: z1 = [1*0.1 + 2*0.3, 1*0.2 + 2*0.4] = [0.7, 1.0]; a1 = sigmoid(z1)
    a1 = 1 / (1 + np.exp(-np.array([0.7, 1.0])))  # [0.668188, 0.731059]
    z2 = a1 @ [0.5, 0.6] + 0.1  # 0.334094 + 0.438635 + 0.1 = 0.872729
    # MSE over one element: L = (z2 - 1)^2; dL/dz2 = 2 (z2 - 1) = -0.254542
    d2 = 2 * (z2 - 1.0)
    # Output layer: dW2 = a1 * d2, db2 = d2. Hidden: d1 = d2 * W2 * a1 (1 - a1); dW1 = x^T d1, db1 = d1.
    d1 = d2 * np.array([0.5, 0.6]) * a1 * (1 - a1)
    lr = 0.5
    trainer = fastbp.Trainer(model, loss="mse", lr=lr, batch_size=None)
    history = trainer.fit(X, y, epochs=1)
    assert history.loss == [pytest.approx((z2 - 1.0) ** 2)]  # 0.016200
    np.testing.assert_allclose(model.weights[1].ravel(), [0.5, 0.6] - lr * a1 * d2, rtol=1e-12)
    np.testing.assert_allclose(model.biases[1], [0.1 - lr * d2], rtol=1e-12)
    np.testing.assert_allclose(model.weights[0], [[0.1, 0.2], [0.3, 0.4]] - lr * np.outer([1.0, 2.0], d1),
                               rtol=1e-12)
    np.testing.assert_allclose(model.biases[0], -lr * d1, rtol=1e-12)


@pytest.mark.parametrize("optimizer,kwargs", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("sgd", dict(momentum=0.8, dampening=0.1)),
    ("adam", dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
])
def test_minibatch_training_matches_reference_steps(optimizer, kwargs, rng):
    """Several epochs of shuffled mini-batches (last one partial) equal the reference rule, step by step."""
    model = fastbp.MLP([5, 7, 3], activation="tanh", dtype=np.float64, seed=2)
    X = rng.normal(size=(23, 5))
    y = rng.integers(0, 3, size=23)
    Y = naive.one_hot(y, 3)
    params = [w.copy() for w in model.weights] + [b.copy() for b in model.biases]
    trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer,
                             lr=fastbp.StepDecay(0.05, step_size=2, gamma=0.5), batch_size=8, seed=11, **kwargs)
    shuffle = np.random.default_rng(11)  # the trainer's documented shuffling: one permutation per epoch
    state = {}
    for epoch in range(3):
        lr = 0.05 * 0.5 ** (epoch // 2)
        order = shuffle.permutation(23)
        for start in range(0, 23, 8):
            idx = order[start:start + 8]
            _, dw, db = naive.loss_and_grads(params[:2], params[2:], ["tanh"], "softmax_cross_entropy", X[idx], Y[idx])
            step = naive.sgd_step if optimizer == "sgd" else naive.adam_step
            params = step(params, dw + db, state, lr, **kwargs)
    history = trainer.fit(X, y, epochs=3)
    assert history.lr == [0.05, 0.05, 0.025]
    for got, ref in zip(model.weights + model.biases, params):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_unshuffled_fit_takes_the_batches_in_row_order(weighted, rng):
    """shuffle=False: batches of consecutive rows, the last one partial, the same every epoch (the reference
    steps), and the shuffling RNG untouched: a later shuffled fit draws what a fresh trainer's first would."""
    model = fastbp.MLP([5, 7, 3], activation="tanh", dtype=np.float64, seed=2)
    X, y = rng.normal(size=(23, 5)), rng.integers(0, 3, size=23)
    Y = naive.one_hot(y, 3)
    w = rng.uniform(0.2, 2.0, 23) if weighted else None
    params = [a.copy() for a in model.weights + model.biases]
    kwargs = dict(momentum=0.9, nesterov=True, weight_decay=1e-3)
    trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", lr=0.05, batch_size=8, seed=11, **kwargs)
    state = {}
    for _ in range(3):
        for start in range(0, 23, 8):
            rows = slice(start, start + 8)
            if weighted:  # the batch's weighted mean loss: rows repeated in proportion is the same gradient
                _, dw, db = _weighted_reference_grads(params, X[rows], Y[rows], w[rows])
            else:
                _, dw, db = naive.loss_and_grads(params[:2], params[2:], ["tanh"], "softmax_cross_entropy", X[rows],
                                                 Y[rows])
            params = naive.sgd_step(params, dw + db, state, 0.05, **kwargs)
    rng_state = trainer._rng.bit_generator.state
    trainer.fit(X, y, epochs=3, shuffle=False, sample_weight=w)
    for got, ref in zip(model.weights + model.biases, params):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert trainer._rng.bit_generator.state == rng_state
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        trainer.fit(X, y, shuffle="no")


def _weighted_reference_grads(params, X, Y, w):
    """The weighted mean loss sum_i w_i l_i / sum_i w_i and its gradients, from per-row reference gradients."""
    parts = [naive.loss_and_grads(params[:2], params[2:], ["tanh"], "softmax_cross_entropy", X[i:i + 1], Y[i:i + 1])
             for i in range(len(X))]
    total = w.sum()
    loss = sum(wi * p[0] for wi, p in zip(w, parts)) / total
    dw = [sum(wi * p[1][l] for wi, p in zip(w, parts)) / total for l in range(2)]
    db = [sum(wi * p[2][l] for wi, p in zip(w, parts)) / total for l in range(2)]
    return loss, dw, db


def test_scale_momentum_multiplies_the_buffer_for_the_next_steps(rng):
    """scale_momentum(c) then a step equals the reference step from c times the buffer; refused where it would
    do nothing (Adam's state, SGD without momentum)."""
    X, y = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    model = fastbp.MLP([3, 4, 2], "tanh", dtype=np.float64, seed=0)
    trainer = fastbp.Trainer(model, loss="mse", lr=0.1, momentum=0.9, batch_size=None)
    trainer.fit(X, y, epochs=2)
    params = [a.copy() for a in model.weights + model.biases]
    layout = model.layout
    buffer = trainer.opt_state[0].copy()
    state = {}
    for layer in range(layout.n_layers):
        bw, bb = layout.views(buffer, layer)
        state[layer], state[layout.n_layers + layer] = 0.25 * bw, 0.25 * bb
    trainer.scale_momentum(0.25)
    np.testing.assert_allclose(trainer.opt_state[0], 0.25 * buffer, rtol=0)
    _, dw, db = naive.loss_and_grads(params[:2], params[2:], ["tanh"], "mse", X, y)
    expected = naive.sgd_step(params, dw + db, state, 0.1, momentum=0.9)
    trainer.fit(X, y, epochs=1)
    for got, ref in zip(model.weights + model.biases, expected):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-14)
    for bad, error, message in ((-1.0, ValueError, "factor must be >= 0"), (np.nan, ValueError, "finite"),
                                ("2", TypeError, "factor must be a real number")):
        with pytest.raises(error, match=message):
            trainer.scale_momentum(bad)
    adam = fastbp.Trainer(fastbp.MLP([3, 2]), loss="mse", optimizer="adam")
    with pytest.raises(ValueError, match="no effect with optimizer='adam'"):
        adam.scale_momentum(2.0)
    with pytest.raises(ValueError, match="no effect without momentum"):
        fastbp.Trainer(fastbp.MLP([3, 2]), loss="mse").scale_momentum(2.0)


def test_fit_continues_from_user_edited_weights(rng):
    model = fastbp.MLP([3, 4, 1], activation="relu", dtype=np.float64, seed=0)
    trainer = fastbp.Trainer(model, loss="mse", lr=0.1, batch_size=None)
    X, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 1))
    model.weights[0][...] = 0.5  # in-place edit
    model.biases[1] = np.array([2.0])  # replacing the array is allowed too
    _, ref_dw, ref_db = naive.loss_and_grads(model.weights, model.biases, ["relu"], "mse", X, y)
    expected_b1 = 2.0 - 0.1 * ref_db[1]
    trainer.fit(X, y, epochs=1)
    np.testing.assert_allclose(model.biases[1], expected_b1, rtol=1e-12)


def test_schedules():
    assert fastbp.ExponentialDecay(0.1, 0.5)(3) == pytest.approx(0.0125)
    assert [fastbp.StepDecay(1.0, 2, 0.1)(e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    model = fastbp.MLP([1, 2, 1], "tanh", dtype=np.float64, seed=0)
    trainer = fastbp.Trainer(model, loss="mse", lr=lambda epoch: 0.1 / (1 + epoch), batch_size=None)
    X = np.linspace(-1, 1, 8).reshape(-1, 1)
    trainer.fit(X, X, epochs=2)
    history = trainer.fit(X, X, epochs=2)  # the schedule's clock runs across fits
    assert history.lr == pytest.approx([0.1 / 3, 0.1 / 4])
    assert history.epoch == [2, 3]


def test_many_epochs_in_one_call_equal_one_at_a_time(rng):
    """The fast path (many epochs per compiled call) and the per-epoch path give identical weights."""
    X, y = rng.normal(size=(50, 4)), rng.integers(0, 3, size=50)
    results = []
    for callbacks in ((), (lambda trainer, history: False,)):
        model = fastbp.MLP([4, 8, 3], "relu", dtype=np.float64, seed=5)
        trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer="adam", lr=0.01, batch_size=7, seed=1)
        history = trainer.fit(X, y, epochs=6, callbacks=callbacks)
        results.append((model.weights[0].copy(), history.loss))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]


def test_target_loss_stops_training():
    X = np.linspace(-1, 1, 64).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, 8, 1], "tanh", dtype=np.float64, seed=0), loss="mse", lr=0.2,
                             batch_size=None)
    history = trainer.fit(X, 0.5 * X, epochs=5000, target_loss=1e-3)
    assert history.stop_reason == "target_loss"
    assert history.loss[-1] <= 1e-3 < history.loss[-2]
    assert len(history.loss) < 5000


@pytest.mark.parametrize("hidden", [8, 80], ids=["narrow", "wide"])
def test_a_target_stop_reports_only_the_epochs_that_ran(hidden):
    """The kernels write no loss after the epoch that reached target_loss; the CPU backend reported the next,
    unwritten entry too (whatever the memory held: a NaN there raised NonFiniteLossError on a fit that had
    reached its target)."""
    X = np.linspace(-1, 1, 64).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, hidden, 1], "tanh", dtype=np.float64, seed=0), loss="mse", lr=0.2,
                             batch_size=None)
    lrs, in_order = np.full(5, 0.2), np.empty((5, 0), np.int64)
    losses, completed, steps = trainer._backend.train_epochs(X, 0.5 * X, 64, in_order, lrs, np.inf, 0)
    assert (len(losses), completed, steps) == (1, 1, 1) and np.isfinite(losses[0])
    # a non-finite epoch is reported, not counted
    losses, completed, _ = trainer._backend.train_epochs(X * np.nan, 0.5 * X, 64, in_order, lrs, -np.inf, 1)
    assert len(losses) == 1 and completed == 0 and np.isnan(losses[0])
    losses, completed, _ = trainer._backend.train_epochs(X, 0.5 * X, 64, in_order, lrs, -np.inf, 1)
    assert len(losses) == completed == 5 and np.all(np.isfinite(losses))


def test_early_stopping_restores_best_weights(rng):
    X, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 1))
    Xv, yv = rng.normal(size=(40, 3)), rng.normal(size=(40, 1))  # unrelated: validation soon gets worse
    model = fastbp.MLP([3, 32, 1], "relu", dtype=np.float64, seed=0)
    trainer = fastbp.Trainer(model, loss="mse", optimizer="adam", lr=0.01, batch_size=8, seed=0)
    history = trainer.fit(X, y, epochs=300, validation_data=(Xv, yv), patience=5)
    assert history.stop_reason == "early_stopping"
    best = int(np.argmin(history.val_loss))
    assert len(history.val_loss) == best + 1 + 5
    assert trainer.evaluate(Xv, yv)["loss"] == pytest.approx(history.val_loss[best], rel=1e-12)


def test_nonfinite_loss_restores_last_finite_epoch(rng):
    X = rng.normal(size=(32, 2)) * 10
    y = rng.normal(size=(32, 1)) * 100
    model = fastbp.MLP([2, 16, 1], "relu", dtype=np.float32, seed=0)
    trainer = fastbp.Trainer(model, loss="mse", lr=10.0, batch_size=None)
    with pytest.raises(fastbp.NonFiniteLossError, match="lower learning rate"):
        trainer.fit(X, y, epochs=100)
    assert all(np.isfinite(w).all() for w in model.weights)
    assert all(np.isfinite(loss) for loss in trainer.history.loss)


def test_choose_learning_rate_picks_the_reference_winner(rng):
    X = rng.normal(size=(200, 4))
    y = (X @ [1.0, -2.0, 0.5, 0.0] > 0).astype(int)
    model = fastbp.MLP([4, 16, 2], "relu", dtype=np.float64, seed=0)
    trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", lr=0.01, batch_size=16, seed=0)
    before = model.weights[0].copy()
    search = trainer.choose_learning_rate(X, y, candidates=(100.0, 0.3, 1e-4), epochs=5)
    assert [row["lr"] for row in search.table] == [100.0, 0.3, 1e-4]
    assert search.best_lr == min(search.table, key=lambda r: r["val_loss"])["lr"] == 0.3
    np.testing.assert_array_equal(model.weights[0], before)  # nothing trained in place
    assert trainer.epochs_done == 0
    assert "<- best" in str(search)


def test_history_records_each_epoch(rng):
    X, y = rng.normal(size=(30, 2)), rng.integers(0, 2, size=30)
    trainer = fastbp.Trainer(fastbp.MLP([2, 4, 2], seed=0), loss="softmax_cross_entropy", lr=0.1, batch_size=10)
    history = trainer.fit(X, y, epochs=3, validation_data=(X, y))
    assert len(history["loss"]) == len(history["val_loss"]) == len(history["val_accuracy"]) == 3
    assert len(history["time"]) == len(history["lr"]) == 3 and all(t > 0 for t in history["time"])
    assert all(0 <= a <= 1 for a in history["val_accuracy"])


def test_cuda_device_without_gpu_says_why():
    from fastbp.backends import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a usable GPU is present")
    with pytest.raises(RuntimeError, match="device='cuda' cannot be used"):
        fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", device="cuda")
    assert fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", device="auto").device == "cpu"


@pytest.mark.slow
def test_seed_regression_learns_slope_two():
    """The seed problem: X = linspace(-1, 1, 100), Y = 2X + N(0, 1), 1-16-1 sigmoid, MSE, full batch."""
    rng = np.random.default_rng(0)
    X = np.linspace(-1, 1, 100).reshape(-1, 1)
    Y = 2 * X + rng.normal(size=X.shape)
    trainer = fastbp.Trainer(fastbp.MLP([1, 16, 1], "sigmoid", seed=0), loss="mse", lr=0.1, batch_size=None, seed=0)
    trainer.fit(X, Y, epochs=3000)
    grid = np.linspace(-1, 1, 50).reshape(-1, 1)
    slope = np.polyfit(grid.ravel(), trainer.predict(grid).ravel(), 1)[0]
    ls_slope = np.polyfit(X.ravel(), Y.ravel(), 1)[0]  # what least squares says this noisy sample supports
    assert abs(slope - ls_slope) < 0.15 and abs(slope - 2) < 0.4, (slope, ls_slope)


@pytest.mark.slow
def test_digits_reach_95_percent():
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    digits = datasets.load_digits()
    X_train, X_test, y_train, y_test = model_selection.train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0)
    trainer = fastbp.Trainer(fastbp.MLP([64, 128, 10], "relu", seed=0), loss="softmax_cross_entropy",
                             lr=0.1, batch_size=32, seed=0)
    trainer.fit(X_train, y_train, epochs=20)
    assert trainer.evaluate(X_test, y_test)["accuracy"] >= 0.95


def test_history_prints_a_short_summary():
    """print(history) is one line of what happened, not every list in full (the lists stay on the object)."""
    X = np.linspace(-1, 1, 40, dtype=np.float32).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, 8, 2], "tanh", seed=0), loss="softmax_cross_entropy", lr=0.5,
                             batch_size=None, seed=0)
    y = (X[:, 0] > 0).astype(int)
    history = trainer.fit(X, y, epochs=300, validation_data=(X, y))
    text = repr(history)
    assert "\n" not in text and len(text) < 250 and str(history) == text
    best = int(np.argmin(history.val_loss))
    assert text.startswith(f"History(300 epochs (0-299), loss {history.loss[0]:.4g} -> {history.loss[-1]:.4g}, ")
    assert f"val_loss {history.val_loss[-1]:.4g} (best {history.val_loss[best]:.4g} at epoch {best})" in text
    assert f"val_accuracy {history.val_accuracy[-1]:.4g}" in text and "lr 0.5," in text
    assert text.endswith("stop_reason='epochs')")
    assert repr(fastbp.History()) == "History(no epochs, stop_reason='epochs')"
