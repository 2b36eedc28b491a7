"""Pointwise math and the fused loss-gradient, written once and compiled for both targets.

Every function here is ``@njit(inline="always")``: the CPU kernels (``@njit``) and the CUDA kernels
(``@cuda.jit``) inline the same source, which is also the form that compiles to PTX without a GPU. One
exception in how they are used: the CPU's ``loss_grad`` writes mse and softmax cross-entropy out over the
whole batch block (the same arithmetic as ``loss_grad_row``, vectorised across rows) and calls
``loss_grad_row`` only for binary cross-entropy; the CUDA kernel calls ``loss_grad_row`` for every loss.

Rules that keep one source valid for float32 and float64 on both targets:
- no bare float literals in arithmetic (``0.5 * x`` would promote float32 to float64): constants are
  built from the argument's own type, ``type(z)(0.5)``;
- stable forms only (log-sum-exp, ``log1p(exp(-|z|))``): the CUDA simulator raises on overflow where a
  GPU would return inf, and the loss must stay finite for logits of +-1e4.

Activations and losses are integer codes (they cache well on disk, unlike closures over functions);
the tables map user-facing names to codes.
"""
from __future__ import annotations

import math

from numba import int64

from .._jit import inline

# The rules below compare and convert with operators and numba's number types, not Python's min, max and int: each
# of those builtins is a numba overload whose implementation is compiled in every new process on its first use
# (about 0.025 s each per argument type, in the user's process and in each compile helper: a cold first predict's
# output transform compiled 0.44 -> 0.37 s without them, AMD EPYC Zen 4). The results are the same bit for bit,
# NaN and infinities included.

# The public, stable surface (documented in fastbp/kernels/API.md): the integer codes and their tables, and the
# inline functions a user's numba code may call. The optimizer hyper-parameter indices (H_*, N_HYPER) are
# fastbp's own (they feed the private optimizer_step driver) and may change.
__all__ = [
    "IDENTITY", "SIGMOID", "TANH", "RELU", "LEAKY_RELU", "ACTIVATIONS", "ACTIVATION_NAMES", "LEAKY_RELU_SLOPE",
    "MSE", "BINARY_CROSS_ENTROPY", "SOFTMAX_CROSS_ENTROPY", "POISSON", "LOSSES", "LOSS_NAMES",
    "SGD", "ADAM", "ADAMW", "OPTIMIZERS",
    "exp_fast", "sigmoid", "sigmoid_from_exp", "activate", "activation_grad", "loss_divisor",
    "binary_cross_entropy_term", "binary_cross_entropy_from_exp",
    "loss_grad_row", "output_transform_row",
    "sgd_update_one", "adam_decay_terms", "adam_update_one", "clip_coefficient",
]

# --- activations -------------------------------------------------------------------------------------------
IDENTITY = 0
SIGMOID = 1
TANH = 2
RELU = 3
LEAKY_RELU = 4

ACTIVATIONS = {
    "identity": IDENTITY,
    "sigmoid": SIGMOID,
    "tanh": TANH,
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}

# PyTorch's default negative slope for nn.LeakyReLU.
LEAKY_RELU_SLOPE = 0.01

# --- losses (each fuses its output transform) ----------------------------------------------------------------
MSE = 0  # identity output
BINARY_CROSS_ENTROPY = 1  # sigmoid output
SOFTMAX_CROSS_ENTROPY = 2  # softmax output
POISSON = 3  # exp output (the log link): z is the log of the predicted rate

LOSSES = {
    "mse": MSE,
    "binary_cross_entropy": BINARY_CROSS_ENTROPY,
    "softmax_cross_entropy": SOFTMAX_CROSS_ENTROPY,
    "poisson": POISSON,
}
LOSS_NAMES = {code: name for name, code in LOSSES.items()}


@inline
def exp_fast(x):
    """exp(x) written as plain arithmetic, so loops over it vectorise (the PyPI llvmlite has no SVML: math.exp
    in a loop is a scalar libm call). Accurate to about 1 ulp: max relative error 3.5e-7 in float32, 4e-15
    in float64 (the polynomial's degree follows the type); 0 below the smallest normal, inf above the
    largest finite result.

    x = n ln2 + r with |r| <= ln2/2 (Cody-Waite: ln2 in two parts), exp(r) by a Taylor polynomial, and 2^n
    built exactly from an integer shift: 2^n = (2^q)^(2^s) * 2^(n - q 2^s) with q = n >> s, so every shift
    stays below 64 bits (s = 2 for float32, 5 for float64).
    """
    T = type(x)
    one = T(1.0)
    # Folds to a constant when compiled: 1e-10 vanishes next to 1 in float32, not in float64.
    single = one + T(1e-10) == one
    if single:
        lo = T(-87.33)
        hi = T(88.72)
        shift = 2
    else:
        lo = T(-708.39)
        hi = T(709.78)
        shift = 5
    xc = lo if x < lo else (hi if x > hi else x)
    # int64(): math.floor returns an int on the CPU target but a float on the CUDA target.
    n = int64(math.floor(xc * T(1.4426950408889634) + T(0.5)))
    nf = T(n)
    r = (xc - nf * T(0.693359375)) - nf * T(-2.12194440054690582e-4)
    # Horner's rule from 1/7! (float32) or 1/13! (float64): the last seven steps are the same for both, written
    # once (numba types and lowers both branches; LLVM folds the one the type does not take).
    if single:
        p = T(1.0 / 5040.0)
    else:
        p = T(1.0 / 6227020800.0)
        p = p * r + T(1.0 / 479001600.0)
        p = p * r + T(1.0 / 39916800.0)
        p = p * r + T(1.0 / 3628800.0)
        p = p * r + T(1.0 / 362880.0)
        p = p * r + T(1.0 / 40320.0)
        p = p * r + T(1.0 / 5040.0)
    p = p * r + T(1.0 / 720.0)
    p = p * r + T(1.0 / 120.0)
    p = p * r + T(1.0 / 24.0)
    p = p * r + T(1.0 / 6.0)
    p = p * r + T(0.5)
    p = p * r + one
    p = p * r + one
    q = n >> shift
    rem = n - (q << shift)
    scale = T(1 << (-q if q < 0 else q))
    if q < 0:
        scale = one / scale
    for _ in range(shift):
        scale = scale * scale
    result = p * scale * T(1 << rem)
    if x < lo:
        result = T(0.0)
    if x > hi:
        result = T(math.inf)
    return result


@inline
def sigmoid(z):
    """Logistic function without overflow: exp is only ever taken of a non-positive number. Branch-free
    apart from a final select, so loops over it vectorise."""
    return sigmoid_from_exp(z, exp_fast(-abs(z)))


@inline
def sigmoid_from_exp(z, e):
    """sigmoid(z) given e = exp(-|z|): 1 / (1 + e) for z >= 0, e / (1 + e) below. For block kernels that take
    every exp of a block in one loop (one copy of exp_fast's code where several rules need one)."""
    one = type(z)(1.0)
    inv = one / (one + e)
    return inv if z >= 0 else e * inv


@inline
def activate(z, act):
    """The activation ``act`` (a code above) applied to one pre-activation value ``z``."""
    if act == RELU:
        return z if z > 0 else type(z)(0.0)
    if act == SIGMOID:
        return sigmoid(z)
    if act == TANH:
        return math.tanh(z)
    if act == LEAKY_RELU:
        return z if z > 0 else type(z)(LEAKY_RELU_SLOPE) * z
    return z


@inline
def activation_grad(y, act):
    """d activation / dz, written from the activation's OUTPUT ``y`` (so backward needs only stored outputs).

    relu and leaky_relu use the subgradient at 0 that PyTorch uses (the negative branch): y > 0 iff z > 0.
    """
    one = type(y)(1.0)
    if act == RELU:
        return one if y > 0 else type(y)(0.0)
    if act == SIGMOID:
        return y * (one - y)
    if act == TANH:
        return one - y * y
    if act == LEAKY_RELU:
        return one if y > 0 else type(y)(LEAKY_RELU_SLOPE)
    return one


@inline
def loss_divisor(loss, n_rows, n_outputs):
    """How many terms the loss is a mean over (PyTorch's default reduction="mean").

    mse, binary_cross_entropy and poisson average over every element; softmax_cross_entropy over samples.
    """
    if loss == SOFTMAX_CROSS_ENTROPY:
        return n_rows
    return n_rows * n_outputs


@inline
def binary_cross_entropy_term(z, t):
    """One output's binary cross-entropy with logits and its gradient: (loss, d loss / dz) =
    (-[t log q + (1-t) log(1-q)], q - t) with q = sigmoid(z), computed as log1p(exp(-|z|)) + (z (1 - t) if
    z >= 0 else -z t), i.e. max(z, 0) - z t + log1p(exp(-|z|)) (no log(0), finite for any z) from one exp of a
    non-positive number. Written as one addition of two terms, not max(z, 0) - z t + log1p(...): compiled with
    fast-math's reassociation (the CPU block kernels, CUDA's fastmath), LLVM may add log1p's small term to
    max(z, 0) before z t cancels it, and a confident right answer's loss (z = 16, t = 1: 1.1e-7) then came
    out 4x too large in float32 and 1e-5 off in float64 (tests/test_math_one_source.py)."""
    return binary_cross_entropy_from_exp(z, t, exp_fast(-abs(z)))


@inline
def binary_cross_entropy_from_exp(z, t, e):
    """binary_cross_entropy_term(z, t) given e = exp(-|z|) (see sigmoid_from_exp)."""
    zero = type(z)(0.0)
    one = type(z)(1.0)
    margin = z * (one - t) if z >= zero else -(z * t)
    return math.log1p(e) + margin, sigmoid_from_exp(z, e) - t


@inline
def loss_grad_row(dlogits, logits, target, loss, inv_divisor):
    """Fused loss and gradient for one sample: writes dlogits (k,), returns the row's summed loss.

    logits (k,) are the output layer's pre-activations z, target (k,) the row's target (one-hot or class
    probabilities for softmax_cross_entropy), inv_divisor = 1 / loss_divisor(...) in the data's dtype.
    dlogits = d(mean loss over the batch) / dz, so summing the returned row losses and multiplying by
    inv_divisor gives the mean loss whose gradient dlogits is. One pass over the row (two for softmax,
    which needs its max first), no log(0), finite for |z| up to the dtype's range.
    """
    k = logits.shape[0]
    zero = type(inv_divisor)(0.0)
    one = type(inv_divisor)(1.0)
    total = zero
    if loss == MSE:
        two_over = type(inv_divisor)(2.0) * inv_divisor
        for j in range(k):
            diff = logits[j] - target[j]
            total += diff * diff
            dlogits[j] = two_over * diff
    elif loss == BINARY_CROSS_ENTROPY:
        for j in range(k):
            term, grad = binary_cross_entropy_term(logits[j], target[j])
            total += term
            dlogits[j] = grad * inv_divisor
    elif loss == POISSON:
        # PyTorch's PoissonNLLLoss(log_input=True): exp(z) - t z, the Poisson negative log-likelihood of
        # count t at rate exp(z) without the log(t!) term. exp_fast: inf past the dtype's range, no trap.
        for j in range(k):
            z = logits[j]
            rate = exp_fast(z)
            total += rate - target[j] * z
            dlogits[j] = (rate - target[j]) * inv_divisor
    else:  # SOFTMAX_CROSS_ENTROPY: sum_j t_j (logsumexp(z) - z_j); the max is subtracted for stability only.
        zmax = logits[0]
        for j in range(1, k):
            zmax = logits[j] if logits[j] > zmax else zmax
        sum_exp = zero
        sum_target = zero
        for j in range(k):
            e = exp_fast(logits[j] - zmax)
            dlogits[j] = e  # staged: softmax numerators
            sum_exp += e
            sum_target += target[j]
        log_sum_exp = zmax + math.log(sum_exp)
        inv_sum_exp = one / sum_exp
        for j in range(k):
            t = target[j]
            total += t * (log_sum_exp - logits[j])
            dlogits[j] = (dlogits[j] * inv_sum_exp * sum_target - t) * inv_divisor
    return total


@inline
def output_transform_row(out, logits, loss):
    """The loss's output transform for one sample: identity (mse), sigmoid (bce), softmax (ce) or exp
    (poisson: the predicted rate)."""
    k = logits.shape[0]
    if loss == MSE:
        for j in range(k):
            out[j] = logits[j]
    elif loss == BINARY_CROSS_ENTROPY:
        for j in range(k):
            out[j] = sigmoid(logits[j])
    elif loss == POISSON:
        for j in range(k):
            out[j] = exp_fast(logits[j])
    else:
        zmax = logits[0]
        for j in range(1, k):
            zmax = logits[j] if logits[j] > zmax else zmax
        total = type(logits[0])(0.0)
        for j in range(k):
            e = exp_fast(logits[j] - zmax)
            out[j] = e
            total += e
        inv_total = type(logits[0])(1.0) / total
        for j in range(k):
            out[j] *= inv_total


# --- optimizers ----------------------------------------------------------------------------------------------
SGD = 0
ADAM = 1
ADAMW = 2  # Adam with decoupled weight decay (torch.optim.AdamW): adam_update_one with decay = 1 - lr * wd
OPTIMIZERS = {"sgd": SGD, "adam": ADAM, "adamw": ADAMW}

# Layout of the float64 hyper-parameter vector the update kernels read (one array, not a dozen arguments).
# H_CLIP: the gradient-norm bound of Trainer(clip_grad_norm=), 0 for none.
H_MOMENTUM, H_DAMPENING, H_WEIGHT_DECAY, H_NESTEROV, H_BETA1, H_BETA2, H_EPS, H_CLIP = range(8)
N_HYPER = 8


@inline
def clip_coefficient(sum_of_squares, max_norm):
    """The factor torch.nn.utils.clip_grad_norm_(params, max_norm) multiplies every gradient by, from the sum of
    the squares of all of them: min(1, max_norm / (||g||_2 + 1e-6)). A NaN norm gives NaN (torch's clamp keeps
    it), an infinite one 0. The update kernels skip the multiplication when the factor is 1 (exact anyway)."""
    coefficient = max_norm / (math.sqrt(sum_of_squares) + 1e-6)
    if coefficient >= 1.0:
        return 1.0
    return coefficient


@inline
def adam_decay_terms(optimizer, lr, weight_decay):
    """(L2 term, decoupled decay factor) of a step for adam_update_one: Adam adds weight_decay * p to the
    gradient, AdamW multiplies p by 1 - lr * weight_decay instead (torch.optim.AdamW). Formed in float64 and
    cast by the caller, as torch forms ``1 - lr * weight_decay`` in Python floats. ``lr`` may be a numpy
    array of per-step rates (host-side tables call ``adam_decay_terms.py_func``)."""
    if optimizer == ADAMW:
        return 0.0, 1.0 - lr * weight_decay
    return weight_decay, 1.0 + 0.0 * lr


@inline
def sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD for element i (foreach=False semantics): L2 decay added to the gradient, momentum
    buffer initialised to the first gradient, nesterov look-ahead."""
    g = grads[i] + weight_decay * params[i]
    if momentum != 0:
        if first_step:
            buf = g
        else:
            buf = momentum * velocity[i] + (type(lr)(1.0) - dampening) * g
        velocity[i] = buf
        if nesterov:
            g = g + momentum * buf
        else:
            g = buf
    params[i] -= lr * g


@inline
def adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                    step_size, sqrt_bias_correction2, decay):
    """torch.optim.Adam / AdamW for element i, in PyTorch's order of operations (so float32 runs match closely):
    p *= decay; g += wd * p; m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2;
    p -= step_size * m / (sqrt(v) / sqrt(1 - beta2**t) + eps), with step_size = lr / (1 - beta1**t).

    Adam: weight_decay is the L2 term added to the gradient, decay = 1. AdamW: weight_decay = 0 and
    decay = 1 - lr * wd (torch's ``param.mul_(1 - lr * weight_decay)`` before the moments, the decay
    "decoupled" from the gradient, Loshchilov & Hutter 2019). Multiplying by 1 is exact, so Adam is unchanged.
    step_size, sqrt_bias_correction2 and decay are computed once per step by the caller, as PyTorch does.
    """
    one = type(lr)(1.0)
    p = params[i] * decay
    g = grads[i] + weight_decay * p
    m = exp_avg[i] + (one - beta1) * (g - exp_avg[i])
    v = beta2 * exp_avg_sq[i] + (one - beta2) * g * g
    exp_avg[i] = m
    exp_avg_sq[i] = v
    params[i] = p - step_size * (m / (math.sqrt(v) / sqrt_bias_correction2 + eps))
