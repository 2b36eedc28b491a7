"""Property-based tests (hypothesis) over random architectures, shapes, dtypes and hyper-parameters.

Example counts come from the hypothesis profile loaded in conftest.py ("fastbp": modest, for CI on two
cores; HYPOTHESIS_PROFILE=thorough for many more). Data are drawn from a numpy RNG seeded by hypothesis,
so every failure replays exactly.
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastbp  # noqa: E402

from . import naive  # noqa: E402
from .conftest import TOLERANCES  # noqa: E402

ACTS = ["sigmoid", "relu", "tanh", "identity", "leaky_relu"]
LOSSES = ["mse", "binary_cross_entropy", "softmax_cross_entropy", "poisson"]
DTYPES = [np.float32, np.float64]

COMMON = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, max_layers=4, max_width=9, max_samples=24):
    n_layers = draw(st.integers(2, max_layers))
    sizes = draw(st.lists(st.integers(1, max_width), min_size=n_layers, max_size=n_layers))
    activations = draw(st.lists(st.sampled_from(ACTS), min_size=n_layers - 2, max_size=n_layers - 2))
    loss = draw(st.sampled_from(LOSSES))
    if loss == "softmax_cross_entropy" and sizes[-1] < 2:
        sizes[-1] = 2
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, max_samples))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, sizes[0])) * scale).astype(dtype)
    k = sizes[-1]
    if loss == "mse":
        y = rng.normal(size=(n, k))
        Y = y
    elif loss == "binary_cross_entropy":
        y = rng.uniform(size=(n, k))
        Y = y
    elif loss == "poisson":
        y = rng.poisson(1.0, size=(n, k)).astype(float)
        Y = y
    else:
        y = rng.integers(0, k, size=n)
        Y = naive.one_hot(y, k)
    return dict(sizes=sizes, activations=activations, loss=loss, dtype=dtype, X=X, y=y, Y=Y, seed=seed)


def away_from_kinks(p, model):
    """relu's derivative jumps at 0: skip draws where a hidden pre-activation sits within rounding of it."""
    Z, _ = naive.forward(model.weights, model.biases, model.activations, p["X"])
    return all(np.abs(z).min() > 1e-4 for z, a in zip(Z[:-1], model.activations) if a in ("relu", "leaky_relu"))


@COMMON
@given(p=problems())
def test_gradients_match_reference(p):
    model = fastbp.MLP(p["sizes"], p["activations"], dtype=p["dtype"], seed=p["seed"] % 1000)
    assume(away_from_kinks(p, model))
    trainer = fastbp.Trainer(model, loss=p["loss"])
    value, dweights, dbiases = trainer.loss_and_grads(p["X"], p["y"])
    ref_value, ref_dw, ref_db = naive.loss_and_grads(model.weights, model.biases, model.activations, p["loss"],
                                                     p["X"], p["Y"])
    tol = TOLERANCES[p["dtype"]]
    np.testing.assert_allclose(value, ref_value, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    for got, ref in zip(dweights + dbiases, ref_dw + ref_db):
        assert got.shape == ref.shape and got.dtype == p["dtype"]
        np.testing.assert_allclose(got, ref, rtol=tol["rtol"] * 20, atol=tol["atol"] * 20)


@COMMON
@given(p=problems(max_layers=3, max_width=6, max_samples=15),
       optimizer=st.sampled_from(["sgd", "adam"]),
       lr=st.floats(1e-4, 0.2),
       batch_size=st.integers(1, 20),
       epochs=st.integers(1, 3),
       momentum=st.sampled_from([0.0, 0.5, 0.9]),
       nesterov=st.booleans(),
       weight_decay=st.sampled_from([0.0, 1e-3]),
       betas=st.tuples(st.sampled_from([0.8, 0.9]), st.sampled_from([0.99, 0.999])))
def test_training_matches_reference_steps(p, optimizer, lr, batch_size, epochs, momentum, nesterov, weight_decay,
                                          betas):
    """Shuffled mini-batch training (float64) equals the reference optimizer applied step by step."""
    sizes, activations, loss = p["sizes"], p["activations"], p["loss"]
    X, y, Y = p["X"].astype(np.float64), p["y"], p["Y"]
    model = fastbp.MLP(sizes, activations, dtype=np.float64, seed=p["seed"] % 1000)
    assume(away_from_kinks(dict(p, X=X), model))
    if optimizer == "sgd":
        nesterov = nesterov and momentum > 0
        kwargs = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    else:
        kwargs = dict(betas=betas, weight_decay=weight_decay)
    params = [w.copy() for w in model.weights] + [b.copy() for b in model.biases]
    trainer = fastbp.Trainer(model, loss=loss, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=5, **kwargs)
    n = X.shape[0]
    shuffle = np.random.default_rng(5)
    state = {}
    L = len(sizes) - 1
    for _ in range(epochs):
        order = shuffle.permutation(n) if min(batch_size, n) < n else np.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            _, dw, db = naive.loss_and_grads(params[:L], params[L:], activations, loss, X[idx], Y[idx])
            step = naive.sgd_step if optimizer == "sgd" else naive.adam_step
            params = step(params, dw + db, state, lr, **kwargs)
    # A run that diverges (poisson's exp overflows on a large step) is the non-finite tests' business: fit raises
    # NonFiniteLossError there. Hypothesis found MLP([1, 1]), poisson, sgd, lr 0.125, batch 2.
    assume(all(np.all(np.isfinite(q)) and np.all(np.abs(q) < 1e100) for q in params))
    history = trainer.fit(X, y, epochs=epochs)
    assert len(history.loss) == epochs
    for got, ref in zip(model.weights + model.biases, params):
        np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-10)


# -- random bad inputs -------------------------------------------------------------------------------------------
def corrupt_X(kind, X, rng):
    n, m = X.shape
    if kind == "nan" or kind == "inf":
        X = X.astype(np.float64)
        X[rng.integers(n), rng.integers(m)] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        return X
    if kind == "columns":
        return np.ones((n, m + rng.integers(1, 4)))
    if kind == "fewer-columns":
        return X[:, :m - 1]
    if kind == "ndim-1":
        return X.ravel()
    if kind == "ndim-3":
        return X[:, :, None]
    if kind == "empty":
        return X[:0]
    return X.astype({"complex": complex, "bool": bool, "object": object, "str": str}[kind])


def corrupt_y(kind, y, loss, k, rng):
    n = len(y)
    if kind == "samples":
        return y[:max(0, n - rng.integers(1, n + 1))] if rng.random() < 0.5 else np.concatenate([y, y[:1]])
    if kind == "nan":
        y = np.array(y, dtype=np.float64)
        y[(rng.integers(n),) + ((rng.integers(k),) if y.ndim == 2 else ())] = np.nan
        return y
    if kind == "range":
        if loss == "softmax_cross_entropy":
            y = np.array(y)
            y[rng.integers(n)] = rng.choice([-rng.integers(1, 100), k + rng.integers(0, 100)])
            return y
        if loss == "binary_cross_entropy":
            y = np.array(y, dtype=np.float64)
            y[rng.integers(n), rng.integers(k)] = rng.choice([-1e-3, 1.0 + 1e-3, 7.0])
            return y
        if loss == "poisson":  # counts are >= 0
            y = np.array(y, dtype=np.float64)
            y[rng.integers(n), rng.integers(k)] = rng.choice([-1e-3, -2.0])
            return y
        return np.ones((n, k + 1))  # mse: wrong column count
    if kind == "fraction":
        return (np.array(y, dtype=np.float64) + 0.5) if loss == "softmax_cross_entropy" else np.ones((n, k + 2))
    return np.array(y).astype({"complex": complex, "bool": bool, "str": str}[kind])


X_KINDS = ["nan", "inf", "columns", "fewer-columns", "ndim-1", "ndim-3", "empty", "complex", "bool", "object", "str"]
Y_KINDS = ["samples", "nan", "range", "fraction", "complex", "bool", "str"]
ENTRY_POINTS = ["fit", "predict", "evaluate", "loss_and_grads", "fit_validation", "choose_learning_rate"]


def trainer_state(trainer):
    return (trainer.model.flat_parameters().tobytes(), trainer.opt_state.tobytes(), trainer.steps_done,
            trainer.epochs_done, repr(trainer._rng.bit_generator.state), repr(trainer.history.as_dict()),
            [w.dtype for w in trainer.model.weights])


@COMMON
@given(p=problems(max_layers=3, max_width=5, max_samples=12),
       target=st.sampled_from(["X", "y"]),
       x_kind=st.sampled_from(X_KINDS), y_kind=st.sampled_from(Y_KINDS),
       entry=st.sampled_from(ENTRY_POINTS), corruption_seed=st.integers(0, 2**16))
def test_random_bad_data_is_rejected_and_changes_nothing(p, target, x_kind, y_kind, entry, corruption_seed):
    rng = np.random.default_rng(corruption_seed)
    model = fastbp.MLP(p["sizes"], p["activations"], dtype=p["dtype"], seed=0)
    trainer = fastbp.Trainer(model, loss=p["loss"], optimizer="adam", lr=0.01, batch_size=4, seed=1)
    X, y = p["X"], p["y"]
    if X.shape[0] >= 2:
        trainer.fit(X, y, epochs=1)  # some state that a bad call could damage
    k = p["sizes"][-1]
    if target == "X" or entry == "predict":
        if x_kind == "fewer-columns":
            assume(X.shape[1] > 1)
        X = corrupt_X(x_kind, X, rng)
    else:
        y = corrupt_y(y_kind, y, p["loss"], k, rng)
    before = trainer_state(trainer)
    with pytest.raises((ValueError, TypeError)) as info:
        if entry == "fit":
            trainer.fit(X, y, epochs=1)
        elif entry == "fit_validation":
            trainer.fit(p["X"], p["y"], epochs=1, validation_data=(X, y))
        elif entry == "predict":
            trainer.predict(X)
        elif entry == "evaluate":
            trainer.evaluate(X, y)
        elif entry == "loss_and_grads":
            trainer.loss_and_grads(X, y)
        else:
            trainer.choose_learning_rate(p["X"], p["y"], candidates=(0.1,), epochs=1, validation_data=(X, y))
    message = str(info.value)
    assert ("X" in message or "y" in message) and "numba" not in message.lower()
    assert trainer_state(trainer) == before


@COMMON
@given(name=st.sampled_from(["loss", "optimizer", "device", "activation"]),
       value=st.text(min_size=0, max_size=12))
def test_random_names_are_rejected_with_the_valid_list(name, value):
    valid = {"loss": ["mse", "binary_cross_entropy", "softmax_cross_entropy"], "optimizer": ["sgd", "adam"],
             "device": ["cpu", "cuda", "auto"], "activation": ACTS}[name]
    assume(value not in valid)
    with pytest.raises(ValueError, match="must be one of") as info:
        if name == "activation":
            fastbp.MLP([2, 3, 1], activation=value)
        else:
            fastbp.Trainer(fastbp.MLP([2, 1]), **({"loss": "mse"} | {name: value}))
    assert all(repr(v) in str(info.value) for v in valid)


@COMMON
@given(arg=st.sampled_from(["lr", "batch_size", "epochs", "momentum", "eps"]),
       value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 0), st.none(),
                       st.text(max_size=3), st.booleans()))
def test_random_bad_hyper_parameters_are_rejected(arg, value):
    valid = {"lr": lambda v: isinstance(v, float) and 0 < v < np.inf,
             "batch_size": lambda v: v is None or (type(v) is int and v >= 1),
             "epochs": lambda v: type(v) is int and v >= 0,
             "momentum": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < np.inf,
             "eps": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < np.inf}
    assume(not valid[arg](value))
    trainer = fastbp.Trainer(fastbp.MLP([2, 3, 1], seed=0), loss="mse", batch_size=2, seed=0)
    X, y = np.ones((4, 2)), np.zeros(4)
    before = trainer_state(trainer)
    with pytest.raises((ValueError, TypeError), match=arg):
        if arg == "epochs":
            trainer.fit(X, y, epochs=value)
        else:
            kwargs = {arg: value} | ({"optimizer": "adam"} if arg == "eps" else {})
            fastbp.Trainer(fastbp.MLP([2, 3, 1], seed=0), loss="mse", **kwargs)
    assert trainer_state(trainer) == before
