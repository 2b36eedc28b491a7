"""Trainer's sample_weight (fit, evaluate, loss_and_grads) against independent references: PyTorch's
per-row losses (reduction="none") weighted by hand, and the identity "integer weights = repeated rows".

The definition (issue 14): a batch's loss is sum_i w_i l_i / sum_i w_i, l_i the row's loss (the mean over
its outputs for mse, binary cross-entropy and poisson, -log p[label] for softmax cross-entropy).
"""
import numpy as np
import pytest

import fastbp

torch = pytest.importorskip("torch")

NETWORKS = {  # sizes, activation: a narrow network (feature-major step) and a wide one (product engine)
    "narrow": ([3, 16, 8, 4], "tanh"),
    "wide": ([20, 160, 4], "relu"),
}
LOSSES = ["mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"]


def problem(sizes, loss, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0]))
    k = sizes[-1]
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, k, size=n)
    elif loss == "binary_cross_entropy":
        y = (rng.random(size=(n, k)) > 0.5).astype(np.float64)
    elif loss == "poisson":
        y = rng.poisson(1.5, size=(n, k)).astype(np.float64)
    else:
        y = rng.normal(size=(n, k))
    w = rng.random(n) * 3
    w[::5] = 0.0  # zero weights are allowed
    return X, y, w


def torch_row_losses(module, X, y, loss):
    out = module(torch.from_numpy(X))
    if loss == "softmax_cross_entropy":
        return torch.nn.functional.cross_entropy(out, torch.from_numpy(y), reduction="none")
    target = torch.from_numpy(y)
    if loss == "mse":
        return ((out - target) ** 2).mean(dim=1)
    if loss == "poisson":
        return torch.nn.functional.poisson_nll_loss(out, target, log_input=True, reduction="none").mean(dim=1)
    return torch.nn.functional.binary_cross_entropy_with_logits(out, target, reduction="none").mean(dim=1)


def torch_weighted(module, X, y, w, loss):
    rows = torch_row_losses(module, X, y, loss)
    wt = torch.from_numpy(w)
    return (wt * rows).sum() / wt.sum()


def flat_grads(dweights, dbiases):
    return np.concatenate([part for dw, db in zip(dweights, dbiases) for part in (dw.ravel(), db)])


def torch_flat_grads(module):
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    return np.concatenate([part for lin in linears for part in (lin.weight.grad.numpy().T.ravel(),
                                                                  lin.bias.grad.numpy())])


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_grads_match_torch(network, loss):
    sizes, act = NETWORKS[network]
    X, y, w = problem(sizes, loss, 29)
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    value, dweights, dbiases = fastbp.Trainer(model, loss=loss).loss_and_grads(X, y, sample_weight=w)
    module = model.to_torch().double()
    reference = torch_weighted(module, X, y, w, loss)
    reference.backward()
    assert value == pytest.approx(reference.item(), rel=1e-12)
    np.testing.assert_allclose(flat_grads(dweights, dbiases), torch_flat_grads(module), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("network, loss, zero_batch", [(network, loss, False) for network in sorted(NETWORKS)
                                                       for loss in LOSSES] + [("narrow", "mse", True)])
def test_fit_matches_torch_with_minibatches(network, loss, zero_batch):
    sizes, act = NETWORKS[network]
    X, y, w = problem(sizes, loss, 37)
    if zero_batch:  # epoch 1's second batch has only zero weights: a zero gradient, and the optimizer steps
        w[np.random.default_rng(5).permutation(37)[8:16]] = 0.0
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    module = model.to_torch().double()
    lr = 0.01 if loss == "poisson" else 0.1  # exp(z) grows fast: 0.1 with momentum diverges on the wide net
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(5)  # the seeded Trainer's per-epoch orders
    losses = []
    for _ in range(3):
        order = rng.permutation(len(X))
        epoch = 0.0
        for start in range(0, len(X), 8):
            rows = order[start:start + 8]
            optimizer.zero_grad()
            if w[rows].sum() > 0:
                batch = torch_weighted(module, X[rows], y[rows], w[rows], loss)
                batch.backward()
                epoch += batch.item() * w[rows].sum()
            else:  # an all-zero batch: a zero gradient, and the optimizer still steps
                for p in module.parameters():
                    p.grad = torch.zeros_like(p)
            optimizer.step()
        losses.append(epoch / w.sum())
    history = fastbp.Trainer(model, loss=loss, lr=lr, momentum=0.9, batch_size=8, seed=5).fit(
        X, y, epochs=3, sample_weight=w)
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    for layer, lin in enumerate(linears):
        np.testing.assert_allclose(model.weights[layer], lin.weight.detach().numpy().T, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(model.biases[layer], lin.bias.detach().numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(history.loss, losses, rtol=1e-10)


def test_zero_weight_rows_have_no_influence():
    sizes, act = NETWORKS["narrow"]
    X, y, _ = problem(sizes, "mse", 8)
    w = np.array([0, 0, 0, 0, 1, 2, 1, 1], dtype=np.float64)
    ref = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    fastbp.Trainer(ref, loss="mse", lr=0.1, batch_size=None).fit(X[4:], y[4:], epochs=2, sample_weight=w[4:])
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    X[:4] = 1e3  # whatever those rows hold
    fastbp.Trainer(model, loss="mse", lr=0.1, batch_size=None).fit(X, y, epochs=2, sample_weight=w)
    np.testing.assert_allclose(model.flat_parameters(), ref.flat_parameters(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_weights_equal_repeated_rows(loss):
    sizes, act = NETWORKS["wide"]
    X, y, _ = problem(sizes, loss, 23)
    counts = np.random.default_rng(3).integers(0, 4, size=23)
    counts[0] = 1
    fits = []
    for weighted in (True, False):
        model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
        trainer = fastbp.Trainer(model, loss=loss, optimizer="adam", lr=0.01, batch_size=None)
        if weighted:
            trainer.fit(X, y, epochs=3, sample_weight=counts)
        else:
            trainer.fit(np.repeat(X, counts, axis=0), np.repeat(y, counts, axis=0), epochs=3)
        fits.append(model.flat_parameters())
    np.testing.assert_allclose(fits[0], fits[1], rtol=1e-9, atol=1e-12)


def test_weights_of_one_are_the_unweighted_fit_bit_for_bit():
    sizes, act = NETWORKS["narrow"]
    X, y, _ = problem(sizes, "mse", 30)
    results = []
    for w in (None, np.ones(30)):
        model = fastbp.MLP(sizes, act, seed=1)
        fastbp.Trainer(model, loss="mse", lr=0.1, batch_size=8, seed=2).fit(X, y, epochs=3, sample_weight=w)
        results.append(model.flat_parameters())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("loss", LOSSES)
def test_evaluate_is_the_weighted_mean(loss):
    sizes, act = NETWORKS["narrow"]
    X, y, w = problem(sizes, loss, 41)
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    trainer = fastbp.Trainer(model, loss=loss)
    scores = trainer.evaluate(X, y, sample_weight=w)
    module = model.to_torch().double()
    with torch.no_grad():
        assert scores["loss"] == pytest.approx(torch_weighted(module, X, y, w, loss).item(), rel=1e-12)
    probabilities = trainer.predict(X)
    if loss == "softmax_cross_entropy":
        right = (probabilities.argmax(axis=1) == y).astype(float)
    elif loss == "binary_cross_entropy":
        right = ((probabilities > 0.5) == (y > 0.5)).mean(axis=1)
    else:
        assert "accuracy" not in scores
        return
    assert scores["accuracy"] == pytest.approx(np.sum(w * right) / w.sum(), rel=1e-12)


BAD_WEIGHTS = [
    (lambda n: -np.ones(n), ValueError, ">= 0"),
    (lambda n: np.r_[np.nan, np.ones(n - 1)], ValueError, "finite"),
    (lambda n: np.r_[np.inf, np.ones(n - 1)], ValueError, "finite"),
    (lambda n: np.zeros(n), ValueError, "all zero"),
    (lambda n: np.ones(n + 1), ValueError, r"shape \(10,\)"),
    (lambda n: np.ones((n, 1)), ValueError, r"shape \(10,\)"),
    (lambda n: ["a"] * n, TypeError, "array of numbers"),
]


@pytest.mark.parametrize("make, error, message", BAD_WEIGHTS)
def test_bad_weights_are_refused_and_change_nothing(make, error, message):
    X, y, _ = problem([3, 5, 2], "mse", 10)
    model = fastbp.MLP([3, 5, 2], seed=0)
    trainer = fastbp.Trainer(model, loss="mse", lr=0.1, batch_size=4, seed=1)
    before, rng_state = model.flat_parameters(), trainer._rng.bit_generator.state
    for call in (lambda w: trainer.fit(X, y, epochs=2, sample_weight=w),
                 lambda w: trainer.evaluate(X, y, sample_weight=w),
                 lambda w: trainer.loss_and_grads(X, y, sample_weight=w)):
        with pytest.raises(error, match=f"sample_weight.*{message}" if error is ValueError else "sample_weight"):
            call(make(10))
    np.testing.assert_array_equal(model.flat_parameters(), before)
    assert trainer.steps_done == 0 and len(trainer.history.loss) == 0
    assert trainer._rng.bit_generator.state == rng_state


class StepwiseTrainer(fastbp.Trainer):
    """Trains through the step hook (rows_grads, then apply_update), as DataParallelTrainer and a clipped GPU
    fit do: the host-side loop's weighted divisors against the compiled train_epochs'."""

    steps_need_python = True


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batch_size", [8, None])
def test_stepwise_loop_matches_train_epochs(loss, batch_size):
    sizes, act = NETWORKS["narrow"]
    X, y, w = problem(sizes, loss, 37)
    w[np.random.default_rng(5).permutation(37)[8:16]] = 0.0  # one batch of epoch 0 weighs nothing
    fits = []
    for cls in (fastbp.Trainer, StepwiseTrainer):
        model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
        trainer = cls(model, loss=loss, optimizer="adam", lr=0.01, batch_size=batch_size, seed=5)
        history = trainer.fit(X, y, epochs=3, sample_weight=w)
        fits.append((model.flat_parameters(), history.loss, trainer.steps_done, trainer.opt_state.copy()))
    (p0, l0, s0, o0), (p1, l1, s1, o1) = fits
    assert s0 == s1 == 3 * (5 if batch_size else 1)
    np.testing.assert_allclose(p1, p0, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(o1, o0, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    plain = StepwiseTrainer(fastbp.MLP(sizes, act, seed=1, dtype=np.float64), loss=loss, optimizer="adam",
                            lr=0.01, batch_size=batch_size, seed=5)
    plain.fit(X, y, epochs=3)
    assert np.abs(plain.model.flat_parameters() - p1).max() > 1e-4  # the weights did count
