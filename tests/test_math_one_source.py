"""One source of the math: every CPU implementation of an activation, its derivative, a loss with its gradient,
an output transform or an optimizer rule gives, value by value, what fastbp.kernels.pointwise's rule gives.

pointwise is the definition: the CUDA kernels compile it as it is (tests/cuda checks them against the CPU), and
the CPU's fast paths are written around it: the product engine's epilogues (activation on the stored tile,
derivative times the incoming gradient), cpu.loss_grad and cpu.output_transform over whole blocks, and the fused
narrow kernel's lane vectors (its own exp, log and tanh, written on simd.SimdVector). Each path is driven here
through a public or module-level entry point on a grid of values with the edges each rule promises to handle,
and compared with pointwise's scalar rule called from a small compiled loop, in float32 and float64.
"""
import numpy as np
import pytest
from numba import njit

from fastbp.kernels import cpu, narrow, pointwise
from fastbp.kernels.pointwise import ACTIVATIONS, LOSSES
from fastbp.layout import Layout

# The reference: pointwise's rules compiled as written (multiply-adds may fuse, nothing is reassociated). The
# paths are compiled with their own fast-math freedoms (cpu.FAST allows reassociation), so a path may differ by a
# few ulp, never by more: a reassociation that changes a rule's result beyond that is a bug of the rule's form
# (binary cross-entropy's term was one).
ULPS = 8
# Except pointwise.exp_fast's reduction x - n ln2 (ln2 in two parts, Cody-Waite) under reassociation: LLVM may
# fold the two parts back into one constant, an error of about |n| ulp of ln2's low part: 2.4e-14 relative
# (about 100 ulp) in float64 at |x| = 700, where n = 1010; in float32, where |n| <= 127, within ULPS.
EXP_ULPS = {np.float32: ULPS, np.float64: 128}
FAST = dict(fastmath={"contract", "nsz"}, error_model="numpy")


def close(got, expected, dtype, ulps=ULPS, atol=0.0):
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(got, expected, rtol=ulps * eps, atol=atol, equal_nan=True)


def grid(dtype):
    """Pre-activations / logits: a dense sweep, both signs of zero, tiny and large values, the ends of exp."""
    big = 80.0 if dtype == np.float32 else 700.0
    values = np.concatenate([np.linspace(-30, 30, 241), [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, -0.5],
                             [big, -big, 1e4, -1e4]])
    return values.astype(dtype)


# --- pointwise's rules, one value at a time ------------------------------------------------------------------
@njit(**FAST)
def _activate(out, z, act):
    for i in range(z.shape[0]):
        out[i] = pointwise.activate(z[i], act)


@njit(**FAST)
def _activation_grad(out, y, act):
    for i in range(y.shape[0]):
        out[i] = pointwise.activation_grad(y[i], act)


@njit(**FAST)
def _loss_grad_rows(dlogits, row_losses, logits, targets, loss, inv_divisor):
    for i in range(logits.shape[0]):
        row_losses[i] = pointwise.loss_grad_row(dlogits[i], logits[i], targets[i], loss, inv_divisor)


@njit(**FAST)
def _output_transform_rows(out, logits, loss):
    for i in range(logits.shape[0]):
        pointwise.output_transform_row(out[i], logits[i], loss)


@njit(**FAST)
def _exp(out, x):
    for i in range(x.shape[0]):
        out[i] = pointwise.exp_fast(x[i])


def reference_activate(z, act):
    out = np.empty_like(z)
    _activate(out, z, ACTIVATIONS[act])
    return out


# --- activations -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("n_rows", [3, 253], ids=["few-rows", "tiles"])  # the plain product, the tiles
def test_product_engine_activation(act, n_rows, dtype):
    # out = act(inp @ I + 0): the product is exact, so out is the epilogue's activation of each value.
    z = np.resize(grid(dtype), (253, 1))
    out = np.empty_like(z)
    for start in range(0, len(z), n_rows):  # the grid in calls of n_rows rows
        cpu.dense_forward(out[start:start + n_rows], z[start:start + n_rows], np.ones((1, 1), dtype),
                          np.zeros(1, dtype), ACTIVATIONS[act])
    close(out[:, 0], reference_activate(z[:, 0].copy(), act), dtype, ulps=EXP_ULPS[dtype])


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_product_engine_activation_on_wide_rows(act, dtype):
    # Every column of a tile and the masked last vector: a (n, 97) block through the identity matrix.
    z = np.resize(grid(dtype), (31, 97))
    out = np.empty_like(z)
    cpu.dense_forward(out, z, np.eye(97, dtype=dtype), np.zeros(97, dtype), ACTIVATIONS[act])
    close(out, reference_activate(z.ravel().copy(), act).reshape(z.shape), dtype, ulps=EXP_ULPS[dtype])


@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_fused_narrow_kernel_activation(act, dtype):
    # The fused kernel's sigmoid and tanh layers (its own lane-vector exp and tanh): one input, weight 1.
    z = grid(dtype)
    lanes = narrow.LANES[np.dtype(dtype)]
    padded = np.resize(z, -(-len(z) // lanes) * lanes)
    forward = narrow.forward_sigmoid if act == "sigmoid" else narrow.forward_tanh
    got = np.empty_like(padded)
    work = np.zeros(2 * lanes, dtype)
    params = np.array([1.0, 0.0], dtype)  # W (1 x 1), b (1,)
    for at in range(0, len(padded), lanes):
        work[:lanes] = padded[at:at + lanes]
        forward(work, params, 0, lanes, 1, 1, 0)
        got[at:at + lanes] = work[lanes:]
    # Its exp is not pointwise.exp_fast (a minimax polynomial on the exponent bits): a few ulp apart, and
    # tanh near 0 in relative terms only down to an absolute 1 ulp of 1.
    close(got, reference_activate(padded, act), dtype, ulps=16, atol=float(np.finfo(dtype).eps))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_product_engine_activation_derivative(act, dtype):
    # dinp = (dout @ I) * act'(y), y the stored output: dout = 1 gives the derivative itself.
    y = reference_activate(grid(dtype), act)
    y = np.resize(y, (253, 1))
    dinp = np.empty_like(y)
    cpu.dense_backward_input(dinp, np.ones((253, 1), dtype), np.ones((1, 1), dtype), y, ACTIVATIONS[act])
    expected = np.empty_like(y[:, 0])
    _activation_grad(expected, y[:, 0].copy(), ACTIVATIONS[act])
    # Derivatives are at most 1: an ulp of 1 absolute (tanh's 1 - y^2 near y = 1 cancels, fused or not).
    close(dinp[:, 0], expected, dtype, atol=2 * float(np.finfo(dtype).eps))


# --- losses ------------------------------------------------------------------------------------------------
def logits_and_targets(loss, dtype, k=3):
    rng = np.random.default_rng(5)
    z = np.resize(grid(dtype), (len(grid(dtype)) // k, k))
    if loss == "softmax_cross_entropy":
        t = np.eye(k)[rng.integers(0, k, len(z))]
    elif loss == "binary_cross_entropy":
        t = rng.integers(0, 2, z.shape).astype(float)
    elif loss == "poisson":
        z = np.clip(z, -30, 30)  # exp(z) of the grid's ends overflows in float32: both sides give inf there
        t = rng.poisson(3.0, z.shape).astype(float)
    else:
        t = rng.normal(size=z.shape)
    return np.ascontiguousarray(z, dtype), t.astype(dtype)


def reference_loss(z, t, loss):
    n, k = z.shape
    inv = z.dtype.type(1.0 / pointwise.loss_divisor(LOSSES[loss], n, k))
    dz = np.empty_like(z)
    rows = np.empty(n, z.dtype)
    _loss_grad_rows(dz, rows, z, t, LOSSES[loss], inv)
    return rows, dz, inv


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_block_loss_grad(loss, dtype):
    z, t = logits_and_targets(loss, dtype)
    rows, dz, inv = reference_loss(z, t, loss)
    got_dz = np.empty_like(z)
    got_rows = np.empty_like(rows)
    cpu.loss_grad(got_dz, got_rows, z, t, LOSSES[loss], inv)
    close(got_rows, rows, dtype, ulps=EXP_ULPS[dtype])
    close(got_dz, dz, dtype, ulps=EXP_ULPS[dtype], atol=float(inv) * float(np.finfo(dtype).eps))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_fused_narrow_kernel_loss_grad(loss, dtype):
    # One sample per call on a [1, k] network with W = 0 and b = the sample's logits, X = 1 and a rate of 0:
    # the epoch's loss is the row's loss over the divisor, and the bias gradient is d loss / dz.
    z, t = logits_and_targets(loss, dtype)
    k = z.shape[1]
    layout = Layout.from_sizes([1, k])
    P = layout.n_params
    hyper = np.zeros(pointwise.N_HYPER)
    divisor = pointwise.loss_divisor(LOSSES[loss], 1, k)
    rows, dz, _ = reference_loss(z, t, loss)
    got_rows = np.empty_like(rows)
    got_dz = np.empty_like(dz)
    grads = np.empty(P, dtype)
    for i in range(len(z)):
        params = np.concatenate([np.zeros(k), z[i]]).astype(dtype)
        losses = np.empty(1)
        narrow.train_epochs_narrow(
            params, np.zeros((2, P), dtype), np.zeros(1, np.int64), grads, np.empty((3, P), dtype),
            narrow.make_workspace(layout.sizes, dtype), np.ones((1, 1), dtype), t[i:i + 1], np.zeros((1, 0), np.int64),
            np.zeros(1), losses, layout.sizes, layout.param_offsets, layout.unit_offsets,
            np.array([ACTIVATIONS["identity"]]), LOSSES[loss], pointwise.SGD, hyper, 1, -np.inf)
        got_rows[i] = losses[0] * divisor
        got_dz[i] = grads[k:]
    # Per row, not per block: dz carries 1 / divisor with n = 1 (reference_loss used n = len(z)). The kernel has
    # its own exp, log and log1p (lane-vector polynomials, a few ulp from pointwise's libm and exp_fast) and
    # sums through float64: 64 ulp, or an ulp of 1 absolute where a loss cancels to near zero.
    scale = z.dtype.type(pointwise.loss_divisor(LOSSES[loss], len(z), k) / divisor)
    close(got_rows, rows, dtype, ulps=64, atol=float(np.finfo(dtype).eps))
    close(got_dz, dz * scale, dtype, ulps=64, atol=float(np.finfo(dtype).eps))


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_block_output_transform(loss, dtype):
    z, _ = logits_and_targets(loss, dtype)
    expected = np.empty_like(z)
    _output_transform_rows(expected, z, LOSSES[loss])
    got = np.empty_like(z)
    cpu.output_transform(got, z, LOSSES[loss])
    close(got, expected, dtype, ulps=EXP_ULPS[dtype])
    # The drivers' own transform of this loss (compiled without the other three: cpu.transform_for) gives the
    # public kernel's numbers bit for bit, and is the one the loss code names.
    block = cpu.transform_for(LOSSES[loss])
    assert block.__name__ == {"mse": "_identity_block", "binary_cross_entropy": "_sigmoid_block",
                              "poisson": "_exp_block", "softmax_cross_entropy": "_softmax_block"}[loss]
    drivers = np.empty_like(z)
    block(drivers, z)
    np.testing.assert_array_equal(drivers.view(np.uint8), got.view(np.uint8))


def test_the_two_exps_agree(dtype):
    # pointwise.exp_fast (the scalar and CUDA code) and narrow.exp_bits (the lane vectors): two algorithms for
    # one rule, each within about 1 ulp of exp, so within a few ulp of each other over the whole range.
    from .test_narrow import lanes_apply

    hi = 88.0 if dtype == np.float32 else 709.0
    x = np.linspace(-hi, hi, 4001).astype(dtype)
    expected = np.empty_like(x)
    _exp(expected, x)
    close(lanes_apply("exp_bits", x), expected, dtype, ulps=4, atol=float(np.finfo(dtype).tiny))


# --- optimizer rules ---------------------------------------------------------------------------------------
@njit(**FAST)
def _sgd(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    for i in range(params.shape[0]):
        pointwise.sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov,
                                 first_step)


@njit(**FAST)
def _adam(params, m, v, grads, lr, beta1, beta2, eps, weight_decay, step_size, sqrt_bc2, decay):
    for i in range(params.shape[0]):
        pointwise.adam_update_one(params, m, v, grads, i, lr, beta1, beta2, eps, weight_decay, step_size, sqrt_bc2,
                                  decay)


@pytest.mark.parametrize("first_step", [True, False])
def test_sgd_rule(first_step, dtype):
    rng = np.random.default_rng(1)
    params, velocity, grads = (rng.normal(size=257).astype(dtype) for _ in range(3))
    f = dtype
    args = (f(0.1), f(0.9), f(0.1), f(1e-3), True, first_step)
    expected_p, expected_v = params.copy(), velocity.copy()
    _sgd(expected_p, expected_v, grads, *args)
    cpu.sgd_update(params, velocity, grads, *args)
    # Sums of a few terms of size about 1, reassociated: a few ulp of 1 absolute.
    atol = 4 * float(np.finfo(dtype).eps)
    close(params, expected_p, dtype, atol=atol)
    close(velocity, expected_v, dtype, atol=atol)


def test_adam_rule(dtype):
    rng = np.random.default_rng(2)
    params, m, grads = (rng.normal(size=257).astype(dtype) for _ in range(3))
    v = rng.random(257).astype(dtype)
    f = dtype
    args = (f(1e-3), f(0.9), f(0.999), f(1e-8), f(1e-2), f(1e-3 / (1 - 0.9 ** 3)), f(np.sqrt(1 - 0.999 ** 3)), f(1.0))
    expected = [a.copy() for a in (params, m, v)]
    _adam(*expected, grads, *args)
    cpu.adam_update(params, m, v, grads, *args)
    for got, want in zip((params, m, v), expected):
        close(got, want, dtype, atol=4 * float(np.finfo(dtype).eps))
