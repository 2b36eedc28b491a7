"""Every CUDA vocabulary kernel, naive and register-tiled, against the numpy reference (tests/naive.py), on a
GPU or in the simulator. Shapes include 1, primes and non-multiples of the (shrunk) block and tile sizes."""
import numpy as np
import pytest

from fastbp.kernels.pointwise import ACTIVATIONS, ADAM, ADAMW, LOSSES, adam_decay_terms, loss_divisor

from .. import naive
from ..conftest import TOLERANCES
from ..test_cpu_kernels import _targets
from .conftest import SIMULATOR, SKIP_REASON, cuda_reason

pytestmark = pytest.mark.skipif(cuda_reason() is not None, reason=SKIP_REASON)

# With TILE = 4: one partial tile, several tiles with a partial one on every axis.
SHAPES = [(1, 1, 1), (5, 7, 3), (9, 6, 10)]
KERNELS = ["tiled", "naive"]


def launch(kernels, name, variant, *args):
    """Call the launcher ``name`` (tiled) or ``name_naive`` on device copies of the host arrays in args;
    copy the arrays back into the host arrays (so tests read results as from the CPU kernels)."""
    launcher = getattr(kernels, name if variant == "tiled" else name + "_naive")
    device = [kernels.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    launcher(*device)
    for a, d in zip(args, device):
        if isinstance(a, np.ndarray):
            d.copy_to_host(a)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", KERNELS)
def test_dense_forward(cuda_kernels, variant, shape, act, dtype, rng):
    B, n_in, n_out = shape
    inp = rng.normal(size=(B, n_in)).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    out = np.full((B, n_out), np.nan, dtype)
    launch(cuda_kernels, "dense_forward", variant, out, inp, w, b, ACTIVATIONS[act])
    expected = naive.ACTIVATIONS[act](inp.astype(np.float64) @ w + b)
    np.testing.assert_allclose(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", KERNELS)
def test_dense_backward_params(cuda_kernels, variant, shape, dtype, rng):
    B, n_in, n_out = shape
    inp = rng.normal(size=(B, n_in)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    dweight = np.full((n_in, n_out), np.nan, dtype)
    dbias = np.full(n_out, np.nan, dtype)
    launch(cuda_kernels, "dense_backward_params", variant, dweight, dbias, dout, inp)
    np.testing.assert_allclose(dweight, inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(dbias, dout.astype(np.float64).sum(0), **TOLERANCES[dtype])


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", KERNELS)
def test_dense_backward_input(cuda_kernels, variant, shape, act, dtype, rng):
    B, n_in, n_out = shape
    z_prev = rng.normal(size=(B, n_in))
    inp = naive.ACTIVATIONS[act](z_prev).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    dinp = np.full((B, n_in), np.nan, dtype)
    launch(cuda_kernels, "dense_backward_input", variant, dinp, dout, w, inp, ACTIVATIONS[act])
    expected = (dout.astype(np.float64) @ w.T) * naive.DERIVATIVES[act](z_prev)
    if act in ("sigmoid", "tanh"):  # the kernel differentiates the rounded output; so does this
        y = inp.astype(np.float64)
        expected = (dout.astype(np.float64) @ w.T) * (y * (1 - y) if act == "sigmoid" else 1 - y * y)
    np.testing.assert_allclose(dinp, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("config", ["r8", "r4", "r4s"])
@pytest.mark.parametrize("name", ["dense_forward", "dense_backward_params", "dense_backward_input"])
def test_tiled_equals_naive_reference(cuda_kernels, monkeypatch, config, name, dtype, rng):
    """The register-tiled kernels, in each tile configuration, sum in the naive kernels' order (k in order,
    exact zeros past the edges, then the bias): equal to rounding (fastmath FMA on a GPU), bit for bit in
    the simulator."""
    monkeypatch.setattr(cuda_kernels, "VOCABULARY_CONFIG", config)
    B, n_in, n_out = 11, 9, 6
    inp = rng.uniform(0.1, 1, size=(B, n_in)).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    results = {}
    for variant in KERNELS:
        if name == "dense_forward":
            outs = [np.full((B, n_out), np.nan, dtype)]
            launch(cuda_kernels, name, variant, outs[0], inp, w, w[0].copy(), ACTIVATIONS["tanh"])
        elif name == "dense_backward_params":
            outs = [np.full((n_in, n_out), np.nan, dtype), np.full(n_out, np.nan, dtype)]
            launch(cuda_kernels, name, variant, *outs, dout, inp)
        else:
            outs = [np.full((B, n_in), np.nan, dtype)]
            launch(cuda_kernels, name, variant, outs[0], dout, w, inp, ACTIVATIONS["sigmoid"])
        results[variant] = outs
    for tiled, ref in zip(results["tiled"], results["naive"]):
        if SIMULATOR:
            np.testing.assert_array_equal(tiled, ref)
        else:
            np.testing.assert_allclose(tiled, ref, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)


def test_dense_backward_is_both_halves(cuda_kernels, dtype, rng):
    B, n_in, n_out = 6, 5, 7
    inp = rng.uniform(size=(B, n_in)).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    dinp, dweight, dbias = (np.full(s, np.nan, dtype) for s in [(B, n_in), (n_in, n_out), n_out])
    launch(cuda_kernels, "dense_backward", "tiled", dinp, dweight, dbias, dout, inp, w, ACTIVATIONS["relu"])
    np.testing.assert_allclose(dweight, inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(dbias, dout.astype(np.float64).sum(0), **TOLERANCES[dtype])
    np.testing.assert_allclose(dinp, (dout.astype(np.float64) @ w.T) * (inp > 0), **TOLERANCES[dtype])


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (19, 4)])
def test_loss_grad_matches_reference(cuda_kernels, loss, n, k, dtype, rng):
    if loss == "softmax_cross_entropy" and k == 1:
        k = 2
    logits = (3 * rng.normal(size=(n, k))).astype(dtype)
    Y = _targets(loss, n, k, rng).astype(dtype)
    dlogits = np.full((n, k), np.nan, dtype)
    row_losses = np.full(n, np.nan, dtype)
    inv = 1.0 / loss_divisor(LOSSES[loss], n, k)
    launch(cuda_kernels, "loss_grad", "tiled", dlogits, row_losses, logits, Y, LOSSES[loss], inv)
    value, grad = naive.loss_and_dlogits(loss, logits.astype(np.float64), Y.astype(np.float64))
    np.testing.assert_allclose(row_losses.astype(np.float64).sum() * inv, value, **TOLERANCES[dtype])
    np.testing.assert_allclose(dlogits, grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"poisson"}))  # poisson: the next test
def test_loss_grad_finite_at_extreme_logits(cuda_kernels, loss, dtype):
    logits = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype)
    Y = np.array([[1.0, 0.0], [1.0, 0.0]], dtype)
    dlogits = np.empty_like(logits)
    row_losses = np.empty(2, dtype)
    launch(cuda_kernels, "loss_grad", "tiled", dlogits, row_losses, logits, Y, LOSSES[loss],
           1.0 / loss_divisor(LOSSES[loss], 2, 2))
    assert np.isfinite(row_losses).all() and np.isfinite(dlogits).all()
    if loss != "mse":
        np.testing.assert_allclose(row_losses, [0.0, 2e4], rtol=1e-6, atol=1e-6)


def test_poisson_at_extreme_logits(cuda_kernels, dtype):
    """As the CPU's (tests/test_cpu_kernels.py): a log-rate of -1e4 stays finite, +1e4 is +inf, never NaN."""
    logits = np.array([[-1e4, 0.0], [1e4, 1.0]], dtype)
    Y = np.array([[2.0, 0.0], [1.0, 3.0]], dtype)
    dlogits = np.empty_like(logits)
    row_losses = np.empty(2, dtype)
    launch(cuda_kernels, "loss_grad", "tiled", dlogits, row_losses, logits, Y, LOSSES["poisson"], 0.25)
    np.testing.assert_allclose(row_losses[0], 2e4 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(dlogits[0], [-0.5, 0.25], rtol=1e-6)
    assert row_losses[1] == np.inf and dlogits[1, 0] == np.inf
    np.testing.assert_allclose(dlogits[1, 1], (np.e - 3.0) / 4, rtol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_output_transform(cuda_kernels, loss, dtype, rng):
    logits = (4 * rng.normal(size=(11, 3))).astype(dtype)
    out = np.full_like(logits, np.nan)
    launch(cuda_kernels, "output_transform", "tiled", out, logits, LOSSES[loss])
    np.testing.assert_allclose(out, naive.output_transform(loss, logits.astype(np.float64)), **TOLERANCES[dtype])


@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay",
                         [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.01), (0.9, 0.0, True, 0.0),
                          (0.5, 0.3, False, 0.1)])
def test_sgd_update_matches_torch_rule(cuda_kernels, momentum, dampening, nesterov, weight_decay, dtype, rng):
    p = rng.normal(size=29)
    state = {}
    params = cuda_kernels.to_device(p.astype(dtype))
    velocity = cuda_kernels.to_device(np.full(29, np.nan, dtype))  # never read on the first step
    for step in range(1, 4):
        g = rng.normal(size=29)
        (p,) = naive.sgd_step([p], [g], state, 0.1, momentum, dampening, weight_decay, nesterov)
        cuda_kernels.sgd_update(params, velocity, cuda_kernels.to_device(g.astype(dtype)), 0.1, momentum,
                                dampening, weight_decay, nesterov, step == 1)
        np.testing.assert_allclose(params.copy_to_host(), p, **TOLERANCES[dtype])


@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_adam_update_matches_torch_rule(cuda_kernels, weight_decay, decoupled, dtype, rng):
    p = rng.normal(size=31)
    state = {}
    params = cuda_kernels.to_device(p.astype(dtype))
    m, v = cuda_kernels.device_zeros(31, dtype), cuda_kernels.device_zeros(31, dtype)
    b1, b2, lr = 0.9, 0.999, 0.01
    for t in range(1, 5):
        g = rng.normal(size=31)
        (p,) = naive.adam_step([p], [g], state, lr, (b1, b2), 1e-8, weight_decay, decoupled)
        l2, decay = adam_decay_terms.py_func(ADAMW if decoupled else ADAM, lr, weight_decay)
        cuda_kernels.adam_update(params, m, v, cuda_kernels.to_device(g.astype(dtype)), lr, b1, b2, 1e-8,
                                 l2, lr / (1 - b1 ** t), np.sqrt(1 - b2 ** t), decay)
        np.testing.assert_allclose(params.copy_to_host(), p, **TOLERANCES[dtype])


def test_gather_rows(cuda_kernels, dtype, rng):
    source = rng.normal(size=(10, 3)).astype(dtype)
    order = rng.permutation(10)
    out = np.empty((5, 3), dtype)
    launch(cuda_kernels, "gather_rows", "tiled", out, source, order, 5)
    np.testing.assert_array_equal(out, source[order[5:10]])


@pytest.mark.parametrize("n", [1, 8, 21])
def test_sum_into_and_add_into(cuda_kernels, n, dtype, rng):
    values = rng.normal(size=n).astype(dtype)
    totals = np.full(3, np.nan, dtype)
    launch(cuda_kernels, "sum_into", "tiled", totals, 1, values)
    np.testing.assert_allclose(totals[1], values.astype(np.float64).sum(), **TOLERANCES[dtype])
    out = values.copy()
    launch(cuda_kernels, "add_into", "tiled", out, values)
    np.testing.assert_array_equal(out, 2 * values)


def test_array_stats(cuda_kernels, dtype, rng):
    values = rng.normal(size=19).astype(dtype)
    stats = np.empty(3, dtype)
    launch(cuda_kernels, "array_stats", "tiled", stats, values)
    np.testing.assert_array_equal(stats, [0, values.min(), values.max()])
    values[[3, 11]] = [np.nan, -np.inf]
    launch(cuda_kernels, "array_stats", "tiled", stats, values)
    assert stats[0] == 2
