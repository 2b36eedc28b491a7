"""Every CPU kernel, naive and fast, against the numpy reference (tests/naive.py)."""
import numpy as np
import pytest

from fastbp.kernels import cpu, gemm
from fastbp.kernels.pointwise import ACTIVATIONS, ADAM, ADAMW, LOSSES, adam_decay_terms, loss_divisor

from . import naive
from .conftest import TOLERANCES

# Shapes with 1, primes, and sizes on both sides of the parallel threshold, SMALL_PRODUCT (below it: plain
# loops) and the product engine's tiles (6 rows x 64 columns float32 with AVX-512, 4 x 24 with AVX2);
# (97, 131, 101) is above PARALLEL_MIN_WORK.
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 2), (13, 17, 11), (37, 64, 1), (61, 89, 97), (130, 33, 70), (7, 65, 129),
          (97, 131, 101)]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", [cpu.dense_forward, cpu.dense_forward_naive], ids=["fast", "naive"])
def test_dense_forward(kernel, shape, act, dtype, rng):
    B, n_in, n_out = shape
    inp = rng.normal(size=(B, n_in)).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    b = rng.normal(size=n_out).astype(dtype)
    out = np.full((B, n_out), np.nan, dtype)  # kernels overwrite: NaN left behind would fail
    kernel(out, inp, w, b, ACTIVATIONS[act])
    expected = naive.ACTIVATIONS[act](inp.astype(np.float64) @ w + b)
    np.testing.assert_allclose(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", [cpu.dense_backward_params, cpu.dense_backward_params_naive],
                         ids=["fast", "naive"])
def test_dense_backward_params(kernel, shape, dtype, rng):
    B, n_in, n_out = shape
    inp = rng.normal(size=(B, n_in)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    dweight = np.full((n_in, n_out), np.nan, dtype)
    dbias = np.full(n_out, np.nan, dtype)
    kernel(dweight, dbias, dout, inp)
    np.testing.assert_allclose(dweight, inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(dbias, dout.astype(np.float64).sum(0), **TOLERANCES[dtype])


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", [cpu.dense_backward_input, cpu.dense_backward_input_naive],
                         ids=["fast", "naive"])
def test_dense_backward_input(kernel, shape, act, dtype, rng):
    B, n_in, n_out = shape
    z_prev = rng.normal(size=(B, n_in))
    inp = naive.ACTIVATIONS[act](z_prev).astype(dtype)  # the previous layer's output
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    dinp = np.full((B, n_in), np.nan, dtype)
    kernel(dinp, dout, w, inp, ACTIVATIONS[act])
    # Reference derivative at z (not from the output), except where float32 rounding moves z across 0.
    expected = (dout.astype(np.float64) @ w.T) * naive.DERIVATIVES[act](z_prev)
    if act == "sigmoid" or act == "tanh":  # the kernel differentiates the rounded output; so does this
        y = inp.astype(np.float64)
        expected = (dout.astype(np.float64) @ w.T) * (y * (1 - y) if act == "sigmoid" else 1 - y * y)
    np.testing.assert_allclose(dinp, expected, **TOLERANCES[dtype])


def test_dense_backward_is_both_halves(dtype, rng):
    inp = rng.normal(size=(9, 5)).astype(dtype)
    w = rng.normal(size=(5, 4)).astype(dtype)
    dout = rng.normal(size=(9, 4)).astype(dtype)
    dinp, dw, db = np.full((9, 5), np.nan, dtype), np.full((5, 4), np.nan, dtype), np.full(4, np.nan, dtype)
    cpu.dense_backward(dinp, dw, db, dout, inp, w, ACTIVATIONS["identity"])
    np.testing.assert_allclose(dinp, dout.astype(np.float64) @ w.T, **TOLERANCES[dtype])
    np.testing.assert_allclose(dw, inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(db, dout.astype(np.float64).sum(0), **TOLERANCES[dtype])


def _targets(loss, n, k, rng):
    if loss == "mse":
        return rng.normal(size=(n, k))
    if loss == "binary_cross_entropy":
        return rng.uniform(size=(n, k))
    if loss == "poisson":
        return rng.poisson(2.0, size=(n, k)).astype(float)
    return naive.one_hot(rng.integers(0, k, size=n), k)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("n,k", [(1, 1), (1, 5), (7, 1), (23, 3), (40, 11)])
def test_loss_grad_matches_reference(loss, n, k, dtype, rng):
    if loss == "softmax_cross_entropy" and k == 1:
        k = 2
    logits = (3 * rng.normal(size=(n, k))).astype(dtype)
    Y = _targets(loss, n, k, rng).astype(dtype)
    dlogits = np.full((n, k), np.nan, dtype)
    row_losses = np.full(n, np.nan, dtype)
    inv = dtype(1.0 / loss_divisor(LOSSES[loss], n, k))
    cpu.loss_grad(dlogits, row_losses, logits, Y, LOSSES[loss], inv)
    value, grad = naive.loss_and_dlogits(loss, logits.astype(np.float64), Y.astype(np.float64))
    np.testing.assert_allclose(row_losses.astype(np.float64).sum() * inv, value, **TOLERANCES[dtype])
    np.testing.assert_allclose(dlogits, grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"poisson"}))  # poisson: the next test
def test_loss_grad_finite_at_extreme_logits(loss, dtype):
    # +-1e4 logits: no overflow, no log(0); the reference values are known in closed form.
    logits = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype)
    Y = np.array([[1.0, 0.0], [1.0, 0.0]], dtype)
    dlogits = np.empty_like(logits)
    row_losses = np.empty(2, dtype)
    inv = dtype(1.0 / loss_divisor(LOSSES[loss], 2, 2))
    cpu.loss_grad(dlogits, row_losses, logits, Y, LOSSES[loss], inv)
    assert np.isfinite(row_losses).all() and np.isfinite(dlogits).all()
    if loss == "softmax_cross_entropy":  # row 0 right with certainty, row 1 wrong by 2e4
        np.testing.assert_allclose(row_losses, [0.0, 2e4], rtol=1e-6)
        np.testing.assert_allclose(dlogits, [[0, 0], [-0.5, 0.5]], atol=1e-6)
    if loss == "binary_cross_entropy":  # row 0 right on both elements, row 1 wrong by 1e4 on each
        np.testing.assert_allclose(row_losses, [0.0, 2e4], rtol=1e-6, atol=1e-6)


def test_poisson_at_extreme_logits(dtype):
    """A log-rate of -1e4 is a rate of 0: exp(z) - y z stays finite (y z). One past the dtype's exp range is an
    infinite rate, and the loss and its gradient are +inf (as PyTorch's), never NaN."""
    logits = np.array([[-1e4, 0.0], [1e4, 1.0]], dtype)
    Y = np.array([[2.0, 0.0], [1.0, 3.0]], dtype)
    dlogits = np.empty_like(logits)
    row_losses = np.empty(2, dtype)
    cpu.loss_grad(dlogits, row_losses, logits, Y, LOSSES["poisson"], dtype(0.25))
    np.testing.assert_allclose(row_losses[0], 2e4 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(dlogits[0], [-0.5, 0.25], rtol=1e-6)
    assert row_losses[1] == np.inf and dlogits[1, 0] == np.inf
    np.testing.assert_allclose(dlogits[1, 1], (np.e - 3.0) / 4, rtol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_output_transform(loss, dtype, rng):
    logits = (4 * rng.normal(size=(11, 3))).astype(dtype)
    out = np.full_like(logits, np.nan)
    cpu.output_transform(out, logits, LOSSES[loss])
    np.testing.assert_allclose(out, naive.output_transform(loss, logits.astype(np.float64)), **TOLERANCES[dtype])


@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay",
                         [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.01), (0.9, 0.0, True, 0.0),
                          (0.5, 0.3, False, 0.1)])
def test_sgd_update_matches_torch_rule(momentum, dampening, nesterov, weight_decay, dtype, rng):
    p = rng.normal(size=29)
    state = {}
    params = p.astype(dtype)
    velocity = np.full(29, np.nan, dtype)  # never read on the first step
    for step in range(1, 4):
        g = rng.normal(size=29)
        (p,) = naive.sgd_step([p], [g], state, 0.1, momentum, dampening, weight_decay, nesterov)
        cpu.sgd_update(params, velocity, g.astype(dtype), dtype(0.1), dtype(momentum), dtype(dampening),
                       dtype(weight_decay), nesterov, step == 1)
        np.testing.assert_allclose(params, p, **TOLERANCES[dtype])


@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_adam_update_matches_torch_rule(weight_decay, decoupled, dtype, rng):
    p = rng.normal(size=31)
    state = {}
    params = p.astype(dtype)
    m, v = np.zeros(31, dtype), np.zeros(31, dtype)
    b1, b2, lr = 0.9, 0.999, 0.01
    for t in range(1, 5):
        g = rng.normal(size=31)
        (p,) = naive.adam_step([p], [g], state, lr, (b1, b2), 1e-8, weight_decay, decoupled)
        l2, decay = adam_decay_terms.py_func(ADAMW if decoupled else ADAM, lr, weight_decay)
        cpu.adam_update(params, m, v, g.astype(dtype), dtype(lr), dtype(b1), dtype(b2), dtype(1e-8),
                        dtype(l2), dtype(lr / (1 - b1 ** t)), dtype(np.sqrt(1 - b2 ** t)), dtype(decay))
        np.testing.assert_allclose(params, p, **TOLERANCES[dtype])


def test_gather_rows(dtype, rng):
    source = rng.normal(size=(10, 3)).astype(dtype)
    order = rng.permutation(10)
    out = np.empty((4, 3), dtype)
    cpu.gather_rows(out, source, order, 5)
    np.testing.assert_array_equal(out, source[order[5:9]])


# --- the fast kernels the training drivers use, against the naive references ----------------------------------
# Sizes around the 6x4 register tile (rows 5-7 and 11-13, columns 3-5), the 64-row column block (63, 64,
# 65, 67), primes, and 1.
FAST_SHAPES = [(1, 1, 1), (3, 5, 7), (4, 4, 4), (5, 1, 9), (6, 8, 4), (7, 3, 5), (12, 2, 3), (13, 17, 11),
               (37, 64, 1), (61, 67, 65), (130, 33, 70), (67, 129, 63)]


def test_product_kernel_asks_for_512_bit_vectors():
    # prefer_wide_vectors must reach LLVM as the function attribute, and on a CPU with AVX-512 the tile
    # loop must then use zmm FMAs (without the attribute LLVM stops at ymm on Skylake-server-line CPUs).
    import re

    from numba import njit

    from fastbp._jit import WIDE_VECTORS_ATTRIBUTE
    from fastbp.kernels.cpu import FAST

    fresh = njit(**FAST)(cpu.sgd_update.py_func)  # a new, uncached compile, so it can be inspected
    p = np.ones(64, np.float32)
    fresh(p, p.copy(), p.copy(), np.float32(0.1), np.float32(0.9), np.float32(0), np.float32(0.01), False, False)
    signature = fresh.signatures[0]
    assert WIDE_VECTORS_ATTRIBUTE in fresh.inspect_llvm(signature)
    from numba.core.codegen import get_host_cpu_features

    if "+avx512f" in get_host_cpu_features().split(","):
        assert re.search(r"vfmadd\w*ps\s+[^\n]*%zmm", fresh.inspect_asm(signature))


# The input gradient against its naive reference; (40, 10, 700) takes the engine's parallel path.
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", FAST_SHAPES + [(40, 10, 700)])
def test_dense_backward_input_matches_naive(shape, act, dtype, rng):
    B, n_in, n_out = shape
    inp = naive.ACTIVATIONS[act](rng.normal(size=(B, n_in))).astype(dtype)
    w = rng.normal(size=(n_in, n_out)).astype(dtype)
    dout = rng.normal(size=(B, n_out)).astype(dtype)
    fast, ref = np.full((B, n_in), np.nan, dtype), np.full((B, n_in), np.nan, dtype)
    cpu.dense_backward_input(fast, dout, w, inp, ACTIVATIONS[act])
    cpu.dense_backward_input_naive(ref, dout, w, inp, ACTIVATIONS[act])
    np.testing.assert_allclose(fast, ref, **TOLERANCES[dtype])


def test_exp_fast_as_plain_python(dtype):
    # The CUDA simulator runs pointwise helpers as Python on numpy scalars (and on the CUDA target
    # math.floor returns a float, which exp_fast must turn into an int before shifting).
    from fastbp.kernels.pointwise import exp_fast, sigmoid

    for x in (-100.0, -20.5, -1.0, 0.0, 0.3, 5.0, 80.0):
        value = exp_fast.py_func(dtype(x))
        if np.exp(x) < np.finfo(dtype).tiny * 4:
            assert value == 0 or value < np.finfo(dtype).tiny * 4
        else:
            np.testing.assert_allclose(value, np.exp(x), rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(sigmoid.py_func(dtype(-3.0)), 1 / (1 + np.exp(3.0)), rtol=1e-6)


# Narrow and wide layers, a 1-unit layer, batches of one row, a partial batch (7 of 9) and a full one: every
# network runs on the product engine (the fused narrow kernel is tested in test_narrow.py).
@pytest.mark.parametrize("sizes", [[1, 16, 1], [3, 1, 2], [5, 32, 7, 3], [2, 33, 2], [64, 40, 10],
                                   [20, 70, 48, 3]],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("n_rows,capacity", [(1, 1), (7, 9), (100, 100)])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_batch_grads_matches_naive(sizes, n_rows, capacity, loss_name, dtype, rng):
    """batch_grads (the drivers' step) against the float64 numpy reference: the loss and every gradient."""
    from fastbp.layout import Layout

    loss = LOSSES[loss_name]
    layout = Layout.from_sizes(sizes)
    acts = ["sigmoid", "relu", "tanh"][:len(sizes) - 2]
    codes = np.array([ACTIVATIONS[a] for a in acts] + [ACTIVATIONS["identity"]], np.int64)
    weights = [rng.normal(size=(a, b)).astype(dtype) for a, b in zip(sizes[:-1], sizes[1:])]
    biases = [rng.normal(size=b).astype(dtype) for b in sizes[1:]]
    if loss == LOSSES["poisson"]:  # log-rates of order 1: with unit weights exp(z) reaches 1e20 and float32
        weights = [(w / np.sqrt(w.shape[0])).astype(dtype) for w in weights]  # gradients cancel to noise
    params = layout.pack(weights, biases, np.empty(layout.n_params, dtype))
    X = rng.normal(size=(n_rows, sizes[0])).astype(dtype)
    k = sizes[-1]
    if loss == LOSSES["softmax_cross_entropy"]:
        Y = naive.one_hot(rng.integers(0, k, n_rows), k).astype(dtype)
    elif loss == LOSSES["binary_cross_entropy"]:
        Y = rng.integers(0, 2, size=(n_rows, k)).astype(dtype)
    elif loss == LOSSES["poisson"]:
        Y = rng.poisson(2.0, size=(n_rows, k)).astype(dtype)
    else:
        Y = rng.normal(size=(n_rows, k)).astype(dtype)
    work = cpu.make_workspace(layout, capacity, k, dtype)
    for buffer in work:  # nan everywhere: a kernel that read what it did not write first would show it
        buffer[...] = np.nan
    work.acts[:n_rows * sizes[0]] = X.ravel()
    inv = dtype(1.0 / loss_divisor(loss, n_rows, k))
    total = cpu.batch_grads(params, Y, np.empty(0, dtype), cpu.network(layout, codes, loss), work, inv, n_rows)
    value, dws, dbs = naive.loss_and_grads(weights, biases, acts, loss_name, X, Y)
    # atol: a saturated binary cross-entropy row (|z| ~ 17) loses its 3e-8 in float32 next to z itself.
    np.testing.assert_allclose(total * inv, value, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=1e-6 if dtype == np.float32 else 1e-12)
    expected = layout.pack(dws, dbs, np.empty(layout.n_params))
    np.testing.assert_allclose(work.grads, expected, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=1e-4 if dtype == np.float32 else 1e-11)


# --- the vocabulary IS the product engine --------------------------------------------------------------------------
def _layer(rng, dtype, B=29, n_in=70, n_out=131):
    return (rng.normal(size=(B, n_in)).astype(dtype), rng.normal(size=(n_in, n_out)).astype(dtype),
            rng.normal(size=n_out).astype(dtype), rng.normal(size=(B, n_out)).astype(dtype))


def test_vocabulary_products_are_the_engine_bit_for_bit(rng):
    """cpu.dense_* give exactly the drivers' product's results (gemm.product: same tiles, same summation order):
    a user's call gets the engine, not a slower kernel of its own. One dtype: the code is the same for both;
    float64's vocabulary products are checked against numpy below."""
    dtype = np.float32
    inp, w, b, dout = _layer(rng, dtype)
    B, n_in = inp.shape
    n_out = w.shape[1]
    panels = np.empty(gemm.workspace_size(B, n_in, n_out, dtype), dtype)
    out, ref = np.empty((B, n_out), dtype), np.empty((B, n_out), dtype)
    cpu.dense_forward(out, inp, w, b, ACTIVATIONS["tanh"])
    gemm.product(gemm.FORWARD, ACTIVATIONS["tanh"], ref, inp, w, b, ref, panels)
    np.testing.assert_array_equal(out, ref)
    dw, db, ref_w, ref_b = np.empty_like(w), np.empty_like(b), np.empty_like(w), np.empty_like(b)
    cpu.dense_backward_params(dw, db, dout, inp)
    gemm.product(gemm.WEIGHT_GRAD, ACTIVATIONS["identity"], ref_w, inp, dout, ref_b, ref_w, panels)
    np.testing.assert_array_equal(dw, ref_w)
    np.testing.assert_array_equal(db, ref_b)
    y = np.tanh(inp)
    dinp, ref_in = np.empty_like(inp), np.empty_like(inp)
    cpu.dense_backward_input(dinp, dout, w, y, ACTIVATIONS["tanh"])
    gemm.product(gemm.INPUT_GRAD, ACTIVATIONS["tanh"], ref_in, dout, w, panels, y, panels)
    np.testing.assert_array_equal(dinp, ref_in)


def test_vocabulary_products_take_operands_whose_rows_are_not_contiguous(dtype, rng):
    """Operands and outputs whose rows are strided (Fortran order, a strided vector): contiguous copies on the
    engine give the reference's results, written back into the strided outputs. Every array of a call strided at
    once: one compiled version per kernel (each costs a cold compile of the engine's code)."""
    inp, w, b, dout = _layer(rng, dtype)
    inp_f, w_f, dout_f = np.asfortranarray(inp), np.asfortranarray(w), np.asfortranarray(dout)
    b_strided = np.repeat(b, 2)[::2]
    assert not (inp_f.flags.c_contiguous or w_f.flags.c_contiguous or b_strided.flags.c_contiguous)
    out_f = np.asfortranarray(np.full((inp.shape[0], w.shape[1]), np.nan, dtype))
    cpu.dense_forward(out_f, inp_f, w_f, b_strided, ACTIVATIONS["relu"])
    np.testing.assert_allclose(out_f, np.maximum(inp.astype(np.float64) @ w + b, 0), **TOLERANCES[dtype])
    dw_f = np.asfortranarray(np.full_like(w, np.nan))
    db_strided = np.full(2 * b.shape[0], np.nan, dtype)[::2]
    cpu.dense_backward_params(dw_f, db_strided, dout_f, inp_f)
    np.testing.assert_allclose(dw_f, inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(db_strided, dout.astype(np.float64).sum(0), **TOLERANCES[dtype])
    dinp_f = np.asfortranarray(np.full(inp.shape, np.nan, dtype))
    y_f = np.asfortranarray(np.tanh(inp))
    cpu.dense_backward_input(dinp_f, dout_f, w_f, y_f, ACTIVATIONS["tanh"])
    expected = (dout.astype(np.float64) @ w.T) * (1 - y_f.astype(np.float64) ** 2)
    np.testing.assert_allclose(dinp_f, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("call", ["forward", "backward_params", "backward_input"])
def test_vocabulary_products_refuse_mismatched_shapes(call, rng):
    inp, w, b, dout = _layer(rng, np.float32, B=8, n_in=5, n_out=7)
    out = np.zeros((8, 7), np.float32)
    before = out.copy()
    with pytest.raises(ValueError, match="shapes do not match"):
        if call == "forward":
            cpu.dense_forward(out, inp, w[:4], b, 0)
        elif call == "backward_params":
            cpu.dense_backward_params(np.zeros((5, 7), np.float32), np.zeros(6, np.float32), dout, inp)
        else:
            cpu.dense_backward_input(np.zeros((8, 5), np.float32), dout[:, :6], w, inp, 0)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 65, 129), (512, 1024, 10), (3, 784, 256)])
def test_each_kernels_workspace_fits_in_workspace_size(shape, dtype):
    """The in-kernel lengths the vocabulary allocates are the terms workspace_size takes the largest of."""
    B, n_in, n_out = shape
    like = np.zeros(1, dtype)
    terms = (gemm.forward_workspace(n_in, n_out, like), gemm.backward_params_workspace(B, n_in, n_out, like),
             gemm.backward_input_workspace(n_in, n_out, like))
    assert max(terms) == gemm.workspace_size(B, n_in, n_out, dtype)
