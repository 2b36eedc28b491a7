"""Trainer's optimizer rules against PyTorch itself: the same network, initial weights, batches and steps,
trained by torch.optim and by fastbp, must end with the same parameters.

The batches are the Trainer's: a seeded Trainer draws each epoch's order as
``numpy.random.default_rng(seed).permutation(n)`` (one draw per epoch), and torch is fed the same rows.
Both narrow networks (fastbp's fused narrow kernel) and wide ones (the product engine) are covered.
"""
import numpy as np
import pytest

import fastbp

torch = pytest.importorskip("torch")

ACTIVATIONS = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid}


def torch_fit(model, X, y, loss, make_optimizer, epochs, batch_size, seed, clip=None):
    """Train a float64 copy of model with torch; returns the per-layer (weights, biases) as numpy arrays."""
    module = model.to_torch().double()
    optimizer = make_optimizer(module.parameters())
    criterion = {"mse": torch.nn.MSELoss(), "softmax_cross_entropy": torch.nn.CrossEntropyLoss()}[loss]
    Xt = torch.from_numpy(X.astype(np.float64))
    yt = torch.from_numpy(y) if loss == "softmax_cross_entropy" else torch.from_numpy(y.astype(np.float64))
    rng = np.random.default_rng(seed)
    n = len(X)
    for _ in range(epochs):
        order = rng.permutation(n) if batch_size < n else np.arange(n)
        for start in range(0, n, batch_size):
            rows = torch.from_numpy(order[start:start + batch_size])
            optimizer.zero_grad()
            criterion(module(Xt[rows]), yt[rows]).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            optimizer.step()
    linears = [m for m in module if isinstance(m, torch.nn.Linear)]
    return [lin.weight.detach().numpy().T for lin in linears], [lin.bias.detach().numpy() for lin in linears]


def problem(sizes, loss, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, sizes[0]))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, sizes[-1], size=n)
    else:
        y = rng.normal(size=(n, sizes[-1]))
    return X, y


NETWORKS = {  # sizes, activation, loss: a narrow network (fused kernel) and a wide one (product engine)
    "narrow": ([3, 16, 8, 2], "tanh", "mse"),
    "wide": ([20, 160, 4], "relu", "softmax_cross_entropy"),
}


def assert_same(model, reference, rtol=1e-9, atol=1e-11):
    weights, biases = reference
    for a, b in zip(model.weights + model.biases, weights + biases):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("weight_decay", [None, 0.3])
def test_adamw_matches_torch(network, weight_decay):
    sizes, act, loss = NETWORKS[network]
    X, y = problem(sizes, loss, 37)
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    reference = torch_fit(model, X, y, loss, lambda p: torch.optim.AdamW(p, lr=0.02, **kwargs), epochs=4,
                          batch_size=8, seed=5)
    trainer = fastbp.Trainer(model, loss=loss, optimizer="adamw", lr=0.02, batch_size=8, seed=5, **kwargs)
    assert trainer.weight_decay == (0.01 if weight_decay is None else weight_decay)  # torch's default
    trainer.fit(X, y, epochs=4)
    assert_same(model, reference)


def test_adamw_is_not_adam_with_l2():
    # The decoupled rule must differ from Adam's L2 rule with the same coefficient (else the test above
    # could pass with either).
    sizes, act, loss = NETWORKS["narrow"]
    X, y = problem(sizes, loss, 37)
    results = []
    for optimizer in ("adam", "adamw"):
        model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
        fastbp.Trainer(model, loss=loss, optimizer=optimizer, lr=0.02, weight_decay=0.3, batch_size=8,
                       seed=5).fit(X, y, epochs=4)
        results.append(model.weights[0].copy())
    assert np.abs(results[0] - results[1]).max() > 1e-4


def test_adamw_float32_close_to_torch():
    sizes, act, loss = NETWORKS["wide"]
    X, y = problem(sizes, loss, 37)
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    reference = torch_fit(model, X, y, loss, lambda p: torch.optim.AdamW(p, lr=0.01), epochs=3, batch_size=8,
                          seed=5)
    model32 = fastbp.MLP(sizes, act, dtype=np.float32)
    model32.set_flat_parameters(model.flat_parameters().astype(np.float32))
    fastbp.Trainer(model32, loss=loss, optimizer="adamw", lr=0.01, batch_size=8, seed=5).fit(
        X.astype(np.float32), y, epochs=3)
    assert_same(model32, reference, rtol=2e-3, atol=2e-4)


def test_adamw_checkpoint_round_trip(tmp_path):
    # Resuming from a checkpoint continues the AdamW run exactly (optimizer name and decay stored).
    sizes, act, loss = NETWORKS["narrow"]
    X, y = problem(sizes, loss, 20)
    straight = fastbp.Trainer(fastbp.MLP(sizes, act, seed=2, dtype=np.float64), loss=loss, optimizer="adamw",
                              lr=0.05, batch_size=5, seed=3)
    straight.fit(X, y, epochs=4)
    first = fastbp.Trainer(fastbp.MLP(sizes, act, seed=2, dtype=np.float64), loss=loss, optimizer="adamw",
                           lr=0.05, batch_size=5, seed=3)
    first.fit(X, y, epochs=2)
    first.save(tmp_path / "run.fastbp")
    resumed = fastbp.Trainer.load(tmp_path / "run.fastbp")
    assert (resumed.optimizer, resumed.weight_decay) == ("adamw", 0.01)
    resumed.fit(X, y, epochs=2)
    for a, b in zip(resumed.model.weights + resumed.model.biases, straight.model.weights + straight.model.biases):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, message", [("adamx", "optimizer"), ("AdamW", "optimizer")])
def test_unknown_optimizer_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        fastbp.Trainer(fastbp.MLP([2, 3, 1]), loss="mse", optimizer=bad)


# -- clip_grad_norm: torch.nn.utils.clip_grad_norm_ between backward() and step() ----------------------------
CLIP_OPTIMIZERS = {
    "sgd-momentum-l2": (dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.1),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1)),
    "adam-l2": (dict(optimizer="adam", lr=0.02, weight_decay=0.1),
                lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1)),
    "adamw": (dict(optimizer="adamw", lr=0.02), lambda p: torch.optim.AdamW(p, lr=0.02)),
}


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("optimizer", sorted(CLIP_OPTIMIZERS))
def test_clip_grad_norm_matches_torch(network, optimizer):
    sizes, act, loss = NETWORKS[network]
    X, y = problem(sizes, loss, 37)
    X = X * 4  # large gradients, so that the bound clips most steps
    kwargs, make_optimizer = CLIP_OPTIMIZERS[optimizer]
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    reference = torch_fit(model, X, y, loss, make_optimizer, epochs=3, batch_size=8, seed=5, clip=0.2)
    fastbp.Trainer(model, loss=loss, batch_size=8, seed=5, clip_grad_norm=0.2, **kwargs).fit(X, y, epochs=3)
    assert_same(model, reference)


def test_clip_grad_norm_changes_training_only_when_the_norm_is_above_the_bound():
    sizes, act, loss = NETWORKS["wide"]
    X, y = problem(sizes, loss, 37)
    results = {}
    for clip in (None, 1e6, 0.2):
        model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
        fastbp.Trainer(model, loss=loss, optimizer="sgd", lr=0.1, batch_size=8, seed=5,
                       clip_grad_norm=clip).fit(X, y, epochs=2)
        results[clip] = model.flat_parameters()
    np.testing.assert_array_equal(results[None], results[1e6])  # a factor of 1 is never applied
    assert np.abs(results[None] - results[0.2]).max() > 1e-3


def test_clipped_update_step_norm():
    # One plain-SGD step (lr 1, no momentum) moves the parameters by exactly the clipped gradient: its norm is
    # the bound (to clip_grad_norm_'s 1e-6 in the denominator).
    sizes, act, loss = NETWORKS["narrow"]
    X, y = problem(sizes, loss, 16)
    model = fastbp.MLP(sizes, act, seed=1, dtype=np.float64)
    trainer = fastbp.Trainer(model, loss=loss, optimizer="sgd", lr=1.0, batch_size=None, clip_grad_norm=0.01)
    _, dweights, dbiases = trainer.loss_and_grads(X, y)
    grads = np.concatenate([part for dw, db in zip(dweights, dbiases) for part in (dw.ravel(), db)])  # layout's order
    assert np.linalg.norm(grads) > 0.01
    before = model.flat_parameters()
    trainer.fit(X, y, epochs=1)
    step = before - model.flat_parameters()
    assert np.linalg.norm(step) == pytest.approx(0.01 * np.linalg.norm(grads) / (np.linalg.norm(grads) + 1e-6),
                                                 rel=1e-9)
    np.testing.assert_allclose(step / np.linalg.norm(step), grads / np.linalg.norm(grads), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_clip_grad_norm_is_refused(bad, error):
    with pytest.raises(error, match="clip_grad_norm"):
        fastbp.Trainer(fastbp.MLP([2, 3, 1]), loss="mse", clip_grad_norm=bad)


def test_clip_grad_norm_is_saved_and_fixed(tmp_path):
    trainer = fastbp.Trainer(fastbp.MLP([2, 3, 1]), loss="mse", clip_grad_norm=0.5)
    assert "clip_grad_norm=0.5" in repr(trainer)
    with pytest.raises(AttributeError):
        trainer.clip_grad_norm = 1.0
    trainer.save(tmp_path / "t.fastbp")
    assert fastbp.Trainer.load(tmp_path / "t.fastbp").clip_grad_norm == 0.5
    assert trainer.state_dict()["trainer"]["clip_grad_norm"] == 0.5
