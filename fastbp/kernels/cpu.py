"""CPU kernels: explicit loops compiled with numba ``@njit``.

Vocabulary shared with ``fastbp.kernels.cuda`` (same names, same signatures, outputs first):
    dense_forward(out, inp, weight, bias, act)
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)
    loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor)
    output_transform(out, logits, loss)
    sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step)
    adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2, decay)
    gather_rows(out, source, order, start)

Every kernel OVERWRITES its outputs (an MLP has no residual fan-in, so nothing accumulates across calls).
The three products are the product engine (``fastbp.kernels.gemm``: register tiles on packed panels, fused
epilogues) on a packing workspace each call allocates, about the size of the weight; products under
SMALL_PRODUCT multiply-adds run as plain loops with no workspace. Operands whose rows are not contiguous are
copied once. Every other kernel allocates nothing; the drivers, the loss, the output transform and the
optimizer compile without numba's reference counting (``cpu_jit(nrt=False)``: a quarter less to compile for the
drivers). ``*_naive`` kernels are the serial references the fast ones are tested against.

Above the kernels sit the CPU-only drivers that run a whole step, epoch or many epochs inside one
compiled call (``train_epochs``, ``forward_pass``, ``dataset_grads``; ``batch_grads`` and
``optimizer_step`` beneath them), so Python is touched once per call rather than once per layer and step.
They take the network and the workspace as two named tuples (``Network``, ``Workspace``; from Python, as plain
tuples, which numba's dispatcher types faster), and they call
the engine, the loss and the optimizer by symbol (``fastbp._jit.SeparatelyCompiled``): each is compiled
once per dtype instead of once per driver that reaches it.

Parameters live in ONE flat vector (W0, b0, W1, b1, ...; see ``fastbp.layout``): one optimizer update over
it, one buffer to allreduce, few kernel arguments.
"""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from numba import types
from numba.extending import overload

from .. import _jit
from .._jit import DriverVersion, SeparatelyCompiled, cpu_jit, inline, prefer_wide_vectors
from . import gemm, simd
from .pointwise import (
    BINARY_CROSS_ENTROPY,
    IDENTITY,
    MSE,
    POISSON,
    SGD,
    SOFTMAX_CROSS_ENTROPY,
    H_BETA1,
    H_BETA2,
    H_CLIP,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    activate,
    activation_grad,
    adam_decay_terms,
    adam_update_one,
    binary_cross_entropy_from_exp,
    clip_coefficient,
    exp_fast,
    loss_divisor,
    sgd_update_one,
    sigmoid_from_exp,
)

# The public, stable surface (documented in fastbp/kernels/API.md): kernels a user's own numba code may call.
# Everything else here (the whole-step drivers, the structures they take, the tuning constants) is fastbp's
# own and may change between releases.
# The vocabulary shared with fastbp.kernels.cuda: the same names with the same signatures in both modules
# (tests/test_kernels_api.py checks it), the serial references the fast kernels are tested against included.
VOCABULARY = (
    "dense_forward", "dense_backward_params", "dense_backward_input", "dense_backward", "loss_grad",
    "output_transform", "sgd_update", "adam_update", "gather_rows",
    "dense_forward_naive", "dense_backward_params_naive", "dense_backward_input_naive",
)
__all__ = [
    *VOCABULARY,
    # views into the flat buffers (inline helpers: callable from numba code only)
    "weight_view", "bias_view", "activation_view",
]

# Below this many multiply-adds a product runs on the calling thread: a parallel region costs microseconds to
# start, more than small layers take (numba issues #3213, #6568), and far more on a loaded machine, where the
# second thread may wait a time slice to be scheduled. 2^20 multiply-adds take about 15 us on one core.
# (The product engine applies it: gemm.PARALLEL_MIN_WORK is the same figure.)
PARALLEL_MIN_WORK = gemm.PARALLEL_MIN_WORK
# Products smaller than this (multiply-adds) run as plain loops, without the engine's packing workspace: an
# online-learning step (one row, 2-32-1) took 0.92 us on loops and 2.06 us on the engine with its buffers.
SMALL_PRODUCT = 1 << 13
# The floating-point freedoms the fast kernels compile with (fastbp._jit says why these).
FAST_MATH = _jit.FAST_MATH
FAST = _jit.FAST


# --- reference kernels (serial, obviously right) -------------------------------------------------------------
@cpu_jit()
def dense_forward_naive(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten. inp (B, n_in), weight (n_in, n_out), bias (n_out,), out (B, n_out)."""
    for i in range(inp.shape[0]):
        for j in range(weight.shape[1]):
            acc = bias[j]
            for k in range(weight.shape[0]):
                acc += inp[i, k] * weight[k, j]
            out[i, j] = activate(acc, act)


@cpu_jit()
def dense_backward_params_naive(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout, dbias = dout.sum(0), overwritten. dout (B, n_out) is d loss / d pre-activation."""
    for k in range(dweight.shape[0]):
        for j in range(dweight.shape[1]):
            acc = dweight.dtype.type(0.0)
            for i in range(dout.shape[0]):
                acc += inp[i, k] * dout[i, j]
            dweight[k, j] = acc
    for j in range(dbias.shape[0]):
        acc = dbias.dtype.type(0.0)
        for i in range(dout.shape[0]):
            acc += dout[i, j]
        dbias[j] = acc


@cpu_jit()
def dense_backward_input_naive(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: the gradient w.r.t. the PREVIOUS layer's
    pre-activation, with that layer's activation derivative (written from its output ``inp``) fused in."""
    for i in range(dout.shape[0]):
        for k in range(weight.shape[0]):
            acc = dinp.dtype.type(0.0)
            for j in range(weight.shape[1]):
                acc += dout[i, j] * weight[k, j]
            dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)


# --- the vocabulary: the product engine (gemm.py) on a workspace of each call's own ------------------------------
# A vocabulary call cannot be handed the engine's packing buffer (its signature is the CUDA one), so it allocates
# one: np.empty of forward_workspace / backward_*_workspace elements, about the size of the weight (4 MiB for a
# 1024 x 1024 float32 layer), from the allocator's free lists after the first call. fastbp's own drivers pass a
# preallocated buffer to the engine instead.
@inline
def _small(batch, weight):
    # Below SMALL_PRODUCT multiply-adds the plain loops are as fast and allocate nothing (see SMALL_PRODUCT).
    return batch * weight.shape[0] * weight.shape[1] < SMALL_PRODUCT


@inline
def _check_dense(what, batch_a, batch_b, n_in_a, n_in_b, n_out_a, n_out_b, n_bias):
    if batch_a != batch_b or n_in_a != n_in_b or n_out_a != n_out_b or n_bias != n_out_a:
        raise ValueError(what)


def _operand(a):
    """In compiled code: ``a`` where its type promises C-contiguous rows and writable, aligned memory (the types
    gemm.product is declared with), else a C-contiguous copy of it (rows that are not contiguous, read-only data)."""
    raise NotImplementedError("compiled code only")


@overload(_operand)
def _operand_for(a):
    if a.layout == "C" and a.mutable and a.aligned:
        return lambda a: a
    return lambda a: a.copy()


@inline
def _copy_back(out, result):
    # The engine wrote ``result``, a contiguous copy of ``out`` (_operand copies an operand whose type does not
    # promise contiguous rows and writable, aligned memory): write it back. Nothing to do when result is out
    # itself. Explicit loops: numba compiles an array-to-array assignment with its shape-mismatch message, string
    # formatting included (2.3 s of a cold cpu.dense_forward, numba 0.68, AMD EPYC Zen 4), for shapes that match.
    if result.ctypes.data != out.ctypes.data:
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = result[i, j]


@cpu_jit()
def dense_forward(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten. out (B, n_out), inp (B, n_in), weight (n_in, n_out),
    bias (n_out,); act an activation code.

    The product engine (gemm.product, called by symbol: register tiles with the bias and activation fused into
    their stores) on a packing workspace this call allocates; below SMALL_PRODUCT multiply-adds, plain loops on
    the weight as stored (no workspace)."""
    _check_dense("dense_forward: shapes do not match (out (B, n_out), inp (B, n_in), weight (n_in, n_out), "
                 "bias (n_out,))", out.shape[0], inp.shape[0], inp.shape[1], weight.shape[0], out.shape[1],
                 weight.shape[1], bias.shape[0])
    if _small(out.shape[0], weight):
        # out[i, :] = act(bias + sum_k inp[i, k] weight[k, :]): each inner loop runs along a row of weight
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = bias[j]
            for k in range(weight.shape[0]):
                a = inp[i, k]
                for j in range(out.shape[1]):
                    out[i, j] += a * weight[k, j]
            for j in range(out.shape[1]):
                out[i, j] = activate(out[i, j], act)
        return
    result = _operand(out)
    panels = np.empty(gemm.forward_workspace(weight.shape[0], weight.shape[1], out), out.dtype)
    gemm.fill_tiles(result)
    gemm.product(gemm.FORWARD, act, result, _operand(inp), _operand(weight), _operand(bias), result, panels)
    _copy_back(out, result)


@cpu_jit()
def dense_backward_params(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten. dweight (n_in, n_out), dbias (n_out,),
    dout (B, n_out), inp (B, n_in). Every sum runs over the batch in row order: results do not depend on the
    number of threads.

    The product engine (gemm.product) on a workspace this call allocates; below SMALL_PRODUCT
    multiply-adds, plain loops."""
    _check_dense("dense_backward_params: shapes do not match (dweight (n_in, n_out), dbias (n_out,), "
                 "dout (B, n_out), inp (B, n_in))", dout.shape[0], inp.shape[0], inp.shape[1], dweight.shape[0],
                 dout.shape[1], dweight.shape[1], dbias.shape[0])
    if _small(dout.shape[0], dweight):
        for k in range(dweight.shape[0]):
            for j in range(dweight.shape[1]):
                dweight[k, j] = 0
        for j in range(dbias.shape[0]):
            dbias[j] = 0
        for i in range(dout.shape[0]):  # row i's outer product, added in row order
            for k in range(dweight.shape[0]):
                a = inp[i, k]
                for j in range(dweight.shape[1]):
                    dweight[k, j] += a * dout[i, j]
            for j in range(dbias.shape[0]):
                dbias[j] += dout[i, j]
        return
    result = _operand(dweight)
    sums = _operand(dbias)
    panels = np.empty(gemm.backward_params_workspace(dout.shape[0], dweight.shape[0], dweight.shape[1], dweight),
                      dweight.dtype)
    gemm.fill_tiles(result)
    gemm.product(gemm.WEIGHT_GRAD, IDENTITY, result, _operand(inp), _operand(dout), sums, result, panels)
    _copy_back(dweight, result)
    if sums.ctypes.data != dbias.ctypes.data:
        for j in range(dbias.shape[0]):
            dbias[j] = sums[j]


@cpu_jit()
def dense_backward_input(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: the gradient w.r.t. the PREVIOUS layer's
    pre-activation, with that layer's activation derivative (written from its output ``inp``) fused in.
    dinp (B, n_in), dout (B, n_out), weight (n_in, n_out), inp (B, n_in).

    The product engine (gemm.product: weight^T packed once, the derivative fused into the tiles'
    stores) on a workspace this call allocates; below SMALL_PRODUCT multiply-adds, dot products along the rows
    of the weight as stored."""
    _check_dense("dense_backward_input: shapes do not match (dinp (B, n_in), dout (B, n_out), "
                 "weight (n_in, n_out), inp (B, n_in))", dinp.shape[0], dout.shape[0], dinp.shape[1],
                 weight.shape[0], dout.shape[1], weight.shape[1], dout.shape[1])
    if inp.shape[0] != dinp.shape[0] or inp.shape[1] != dinp.shape[1]:
        raise ValueError("dense_backward_input: inp must be shaped like dinp (B, n_in)")
    if _small(dout.shape[0], weight):
        zero = dinp.dtype.type(0.0)
        for i in range(dinp.shape[0]):
            for k in range(dinp.shape[1]):
                acc = zero
                for j in range(dout.shape[1]):
                    acc += dout[i, j] * weight[k, j]
                dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)
        return
    result = _operand(dinp)
    panels = np.empty(gemm.backward_input_workspace(weight.shape[0], weight.shape[1], dinp), dinp.dtype)
    gemm.fill_tiles(result)
    gemm.product(gemm.INPUT_GRAD, inp_act, result, _operand(dout), _operand(weight), panels, _operand(inp), panels)
    _copy_back(dinp, result)


@cpu_jit()
def dense_backward(dinp, dweight, dbias, dout, inp, weight, inp_act):
    """Both halves of a dense layer's backward pass (see dense_backward_params, dense_backward_input)."""
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)


@cpu_jit(nrt=False, **FAST)
def loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor):
    """Fused loss and gradient, overwritten: dlogits (B, k) = d mean-loss / d logits, row_losses (B,) each
    row's summed loss. logits, targets (B, k); inv_divisor = 1 / loss_divisor(loss, n, k).

    The losses are written out over the whole (B, k) block here (pointwise.loss_grad_row's arithmetic:
    binary cross-entropy through pointwise.binary_cross_entropy_from_exp): taking a row view per sample costs a
    reference-count round trip each, which was 44 ns a row, more than the arithmetic. Every exp the block needs
    (exp(-|z|), exp(z) or exp(z - max)) is taken in one loop over it, dlogits holding the arguments: the loop
    vectorises, and exp_fast's code is compiled once, not once per loss (this function's cold compile,
    AMD EPYC Zen 4: see the commit)."""
    prefer_wide_vectors()
    n = logits.shape[0]
    k = logits.shape[1]
    zero = type(inv_divisor)(0.0)
    if loss == MSE:
        two_over = type(inv_divisor)(2.0) * inv_divisor
        for i in range(n):
            total = zero
            for j in range(k):
                diff = logits[i, j] - targets[i, j]
                total += diff * diff
                dlogits[i, j] = two_over * diff
            row_losses[i] = total
        return
    # Pass 1: the argument of each output's exp; softmax's row max waits in row_losses (stability only).
    if loss == BINARY_CROSS_ENTROPY:
        for i in range(n):
            for j in range(k):
                dlogits[i, j] = -abs(logits[i, j])
    elif loss == POISSON:
        for i in range(n):
            for j in range(k):
                dlogits[i, j] = logits[i, j]
    else:  # SOFTMAX_CROSS_ENTROPY
        for i in range(n):
            zmax = logits[i, 0]
            for j in range(1, k):
                zmax = logits[i, j] if logits[i, j] > zmax else zmax  # not max(): see pointwise
            row_losses[i] = zmax
            for j in range(k):
                dlogits[i, j] = logits[i, j] - zmax
    # Pass 2: the exps, one loop over the block.
    flat = simd.flat(dlogits)
    for t in range(n * k):
        flat[t] = exp_fast(flat[t])
    # Pass 3: each loss from its exps.
    if loss == BINARY_CROSS_ENTROPY:
        for i in range(n):
            total = zero
            for j in range(k):
                term, grad = binary_cross_entropy_from_exp(logits[i, j], targets[i, j], dlogits[i, j])
                total += term
                dlogits[i, j] = grad * inv_divisor
            row_losses[i] = total
    elif loss == POISSON:  # exp(z) - t z and (exp(z) - t) / divisor
        for i in range(n):
            total = zero
            for j in range(k):
                rate = dlogits[i, j]
                total += rate - targets[i, j] * logits[i, j]
                dlogits[i, j] = (rate - targets[i, j]) * inv_divisor
            row_losses[i] = total
    else:  # SOFTMAX_CROSS_ENTROPY: sum_j t_j (logsumexp(z) - z_j) and (softmax * sum(t) - t) / divisor
        one = type(inv_divisor)(1.0)
        for i in range(n):
            sum_exp = zero
            sum_target = zero
            for j in range(k):
                sum_exp += dlogits[i, j]
                sum_target += targets[i, j]
            log_sum_exp = row_losses[i] + math.log(sum_exp)
            scale = one / sum_exp * sum_target
            total = zero
            for j in range(k):
                t = targets[i, j]
                total += t * (log_sum_exp - logits[i, j])
                dlogits[i, j] = (dlogits[i, j] * scale - t) * inv_divisor
            row_losses[i] = total


# Each loss's output transform over a (B, k) block, as the drivers call it (by symbol: see transform_for) and as
# output_transform links it. Each is written out in full, its exps in one loop over the block (it vectorises):
# with the passes as inline helpers, numba's inlining cost what leaving out the other losses saved (the
# softmax one compiled in 0.67 s against 0.42 s written out, AMD EPYC Zen 4).
@cpu_jit(nrt=False, no_cpython_wrapper=True, **FAST)
def _identity_block(out, logits):
    # mse's output: the logits as they are
    prefer_wide_vectors()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = logits[i, j]


@cpu_jit(nrt=False, no_cpython_wrapper=True, **FAST)
def _sigmoid_block(out, logits):
    # binary cross-entropy's output: sigmoid(z) from exp(-|z|) (pointwise.sigmoid_from_exp)
    prefer_wide_vectors()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = -abs(logits[i, j])
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = exp_fast(out[i, j])
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = sigmoid_from_exp(logits[i, j], out[i, j])


@cpu_jit(nrt=False, no_cpython_wrapper=True, **FAST)
def _exp_block(out, logits):
    # poisson's output: the rate exp(z)
    prefer_wide_vectors()
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = exp_fast(logits[i, j])


@cpu_jit(nrt=False, no_cpython_wrapper=True, **FAST)
def _softmax_block(out, logits):
    # softmax cross-entropy's output: exp(z - row max) (the max for stability only), each row divided by its sum
    prefer_wide_vectors()
    for i in range(logits.shape[0]):
        zmax = logits[i, 0]
        for j in range(1, logits.shape[1]):
            zmax = logits[i, j] if logits[i, j] > zmax else zmax  # not max(): see pointwise
        for j in range(logits.shape[1]):
            out[i, j] = logits[i, j] - zmax
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            out[i, j] = exp_fast(out[i, j])
    for i in range(logits.shape[0]):
        total = out.dtype.type(0.0)
        for j in range(logits.shape[1]):
            total += out[i, j]
        inv_total = out.dtype.type(1.0) / total
        for j in range(logits.shape[1]):
            out[i, j] *= inv_total


@cpu_jit(nrt=False, **FAST)
def output_transform(out, logits, loss):
    """out (B, k) = the loss's output transform of logits (B, k): identity, sigmoid, softmax or exp.

    Over the whole block, as loss_grad (pointwise.output_transform_row's arithmetic, sigmoid through
    pointwise.sigmoid_from_exp): one loop per pass instead of a row view and its reference count per sample,
    and each transform's exps in one loop over the block. Each loss's transform is a compiled function of its
    own, which the drivers call alone (transform_for)."""
    _transform_by_loss(_identity_block, _sigmoid_block, _exp_block, _softmax_block, out, logits, loss)


@inline
def _transform_by_loss(identity, sigmoid, exp, softmax, out, logits, loss):
    # out = the loss's transform of logits, through the one of the four given: linked (output_transform) or by
    # symbol (the drivers: see transform_for)
    if loss == MSE:
        identity(out, logits)
    elif loss == BINARY_CROSS_ENTROPY:
        sigmoid(out, logits)
    elif loss == POISSON:
        exp(out, logits)
    else:
        softmax(out, logits)


@cpu_jit(nrt=False, **FAST)
def sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD step over flat vectors (P,), in place. Scalars in the parameters' dtype.
    Serial: about 1 ns a parameter, ~1% of a W4 step; a parallel path cost a second of cold compile."""
    prefer_wide_vectors()
    for i in range(params.shape[0]):
        sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov, first_step)


@cpu_jit(nrt=False, **FAST)
def adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2, decay):
    """torch.optim.Adam (decay = 1) or AdamW (weight_decay = 0, decay = 1 - lr * wd) step over flat vectors
    (P,), in place; see pointwise.adam_update_one. Scalars in the parameters' dtype. Serial."""
    prefer_wide_vectors()
    for i in range(params.shape[0]):
        adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                        step_size, sqrt_bias_correction2, decay)


@inline
def _copy_row(out, r, source, row):
    # out[r, :] = source[row, :]: an explicit loop (a slice assignment in a parallel=True function is a parfor,
    # i.e. a thread launch, which costs more than the copy for small batches)
    for j in range(out.shape[1]):
        out[r, j] = source[row, j]


@cpu_jit()
def gather_rows(out, source, order, start):
    """out[r] = source[order[start + r]] for r < out.shape[0], overwritten: one mini-batch, contiguous."""
    for r in range(out.shape[0]):
        _copy_row(out, r, source, order[start + r])


# --- views into flat buffers ---------------------------------------------------------------------------------
@inline
def weight_view(params, sizes, param_offsets, layer):
    """Layer ``layer``'s weight, (sizes[layer], sizes[layer + 1]), as a view into the flat vector ``params``
    (P,) laid out by fastbp.layout.Layout (W0, b0, W1, b1, ...); works on any vector laid out like it (the
    gradients). Inline: callable from numba code only."""
    return simd.matrix(params, param_offsets[layer], sizes[layer], sizes[layer + 1])


@inline
def bias_view(params, sizes, param_offsets, layer):
    """Layer ``layer``'s bias, (sizes[layer + 1],), as a view into the flat vector ``params`` (P,) (see
    weight_view). Inline: callable from numba code only."""
    start = param_offsets[layer] + sizes[layer] * sizes[layer + 1]
    return params[start:start + sizes[layer + 1]]


@inline
def activation_view(buffer, sizes, unit_offsets, capacity, layer, n_rows):
    """Layer ``layer``'s (n_rows, sizes[layer]) slot of a workspace buffer of ``capacity`` rows."""
    return simd.matrix(buffer, capacity * unit_offsets[layer], n_rows, sizes[layer])


# --- what the drivers take ----------------------------------------------------------------------------------
# The network: layer widths (L + 1,), each layer's weight offset in the flat parameters (L,), cumulative widths
# (L + 2,) (fastbp.layout.Layout), each layer's activation code (L,), all int64; the loss code.
Network = namedtuple("Network", ["sizes", "param_offsets", "unit_offsets", "act_codes", "loss"])
# The buffers of a batch of up to ``capacity`` rows, all of the parameters' dtype: activations and deltas
# (capacity * sum(sizes) each, one slot per layer: activation_view), row_losses (capacity,), targets
# (capacity, k) and weights (capacity,) (a shuffled batch's gathered targets and sample weights), grads and
# grads_chunk (P,), backup (3, P) (an epoch's starting parameters and optimizer state), and the engine's
# packing panels (scratch_size(...)). Build it with make_workspace.
Workspace = namedtuple("Workspace", ["acts", "deltas", "row_losses", "targets", "weights", "grads", "grads_chunk",
                                     "backup", "scratch"])


def network(layout, act_codes, loss) -> Network:
    """The Network of a fastbp.layout.Layout, its activation codes and loss code."""
    return Network(layout.sizes, layout.param_offsets, layout.unit_offsets,
                   np.ascontiguousarray(act_codes, dtype=np.int64), int(loss))


def scratch_size(n_params, capacity, n_units):
    """Length of the engine's packing buffer for a batch of ``capacity`` rows: gemm.workspace_size of any one
    layer, bounded from P and sum(sizes) with the widest tile, so the bound holds for every layer, dtype and
    CPU (each layer's packed weight, n_in x (n_out + NR - 1) <= P + n_units (NR - 1); its packed batch,
    capacity x (n_out + NR - 1 + n_in + TILE_ROWS - 1))."""
    nr = GEMM_MAX_TILE_COLUMNS
    return max(n_params + n_units * (nr - 1), (capacity + 1) * (n_units + nr + 6))


# The widest tile of the product engine (float32 with 512-bit vectors: 4 vectors of 16; gemm.tile_columns).
GEMM_MAX_TILE_COLUMNS = 64


def make_workspace(layout, capacity: int, n_outputs: int, dtype) -> Workspace:
    """A Workspace for batches of up to ``capacity`` rows of a network laid out by ``layout``."""
    size = layout.workspace_size(capacity)
    return Workspace(np.empty(size, dtype), np.empty(size, dtype), np.empty(capacity, dtype),
                     np.empty((capacity, n_outputs), dtype), np.empty(capacity, dtype),
                     np.empty(layout.n_params, dtype), np.empty(layout.n_params, dtype),
                     np.empty((3, layout.n_params), dtype),
                     np.empty(scratch_size(layout.n_params, capacity, int(layout.unit_offsets[-1])), dtype))


def _network_type():
    indices = types.Array(types.int64, 1, "C")
    return types.NamedTuple([indices, indices, indices, indices, types.int64], Network)


def _workspace_type(f):
    vector = types.Array(f, 1, "C")
    matrix = types.Array(f, 2, "C")
    return types.NamedTuple([vector, vector, vector, matrix, vector, vector, vector, matrix, vector], Workspace)


# --- drivers: a step, an epoch, many epochs in one compiled call ---------------------------------------------
@inline
def _copy_rows(out, source, start):
    # out[r, :] = source[start + r, :] (see _copy_row)
    for r in range(out.shape[0]):
        _copy_row(out, r, source, start + r)


@inline
def _forward(params, net, work, n_rows):
    # Forward through every layer on the product engine; work.acts' layer-0 slot must hold the n_rows input
    # rows. Returns the logits (a view into work.acts).
    sizes = net.sizes
    capacity = work.row_losses.shape[0]
    n_layers = sizes.shape[0] - 1
    for layer in range(n_layers):
        gemm.product(gemm.FORWARD, net.act_codes[layer],
                     activation_view(work.acts, sizes, net.unit_offsets, capacity, layer + 1, n_rows),
                     activation_view(work.acts, sizes, net.unit_offsets, capacity, layer, n_rows),
                     weight_view(params, sizes, net.param_offsets, layer),
                     bias_view(params, sizes, net.param_offsets, layer),
                     simd.matrix(work.acts, 0, 0, 0), work.scratch)
    return activation_view(work.acts, sizes, net.unit_offsets, capacity, n_layers, n_rows)


@inline
def weighted_inv_divisor(loss, weights, k):
    """1 / (sum of the weights * the divisor of one row: k for mse and binary cross-entropy, 1 for softmax
    cross-entropy), in float64: what a weighted batch's summed row losses are multiplied by. 0 when the
    weights sum to 0 (such a batch has no loss and a zero gradient)."""
    total = 0.0
    for i in range(weights.shape[0]):
        total += np.float64(weights[i])
    if total == 0.0:
        return 0.0
    return 1.0 / (total * loss_divisor(loss, 1, k))


def _batch_grads_signature(f):
    matrix = types.Array(f, 2, "C")
    vector = types.Array(f, 1, "C")
    # row_weights read-only: dataset_grads passes a slice of the caller's sample weights, which the backend hands
    # over read-only (see fastbp._jit.read_only); train_epochs its workspace's copy
    return (vector, matrix, vector.copy(readonly=True), _network_type(), _workspace_type(f), f, types.int64)


@cpu_jit(nrt=False, no_cpython_wrapper=True)  # called by symbol: see _jit.SeparatelyCompiled
def _batch_grads(params, targets, row_weights, net, work, inv_divisor, n_rows):
    """One forward and backward pass on the n_rows input rows in work.acts' layer-0 slot: work.grads (P,)
    overwritten with d(sum of row losses * inv_divisor)/d params. Returns the float64 sum of the row losses.

    targets (n_rows, k). row_weights (n_rows,) or empty: row i's loss counts w_i times and its gradient is
    scaled by w_i (inv_divisor then holds 1 / the batch's weighted divisor: weighted_inv_divisor).
    The products run on the engine (gemm.product: register tiles on packed panels, the bias and activation
    fused into the forward's stores, the activation derivative into the input gradient's); work.scratch
    holds its panels, reused by every product."""
    sizes = net.sizes
    capacity = work.row_losses.shape[0]
    n_layers = sizes.shape[0] - 1
    logits = _forward(params, net, work, n_rows)
    dlogits = activation_view(work.deltas, sizes, net.unit_offsets, capacity, n_layers, n_rows)
    row_losses = work.row_losses[:n_rows]
    loss_block(dlogits, row_losses, logits, targets, net.loss, inv_divisor)
    total = 0.0
    if row_weights.shape[0] == 0:
        for i in range(n_rows):
            total += row_losses[i]
    else:
        k = dlogits.shape[1]
        for i in range(n_rows):
            w = row_weights[i]
            total += np.float64(w) * np.float64(row_losses[i])
            for j in range(k):
                dlogits[i, j] *= w
    for layer in range(n_layers - 1, -1, -1):
        dout = activation_view(work.deltas, sizes, net.unit_offsets, capacity, layer + 1, n_rows)
        inp = activation_view(work.acts, sizes, net.unit_offsets, capacity, layer, n_rows)
        gemm.product(gemm.WEIGHT_GRAD, 0, weight_view(work.grads, sizes, net.param_offsets, layer), inp, dout,
                     bias_view(work.grads, sizes, net.param_offsets, layer), dout[:0], work.scratch)
        if layer > 0:  # the input layer's gradient is never needed
            gemm.product(gemm.INPUT_GRAD, net.act_codes[layer - 1],
                         activation_view(work.deltas, sizes, net.unit_offsets, capacity, layer, n_rows), dout,
                         weight_view(params, sizes, net.param_offsets, layer), work.scratch, inp, work.scratch)
    return total


batch_grads = SeparatelyCompiled(_batch_grads, _batch_grads_signature, returns=types.float64)


def _loss_signature(f):
    matrix = types.Array(f, 2, "C")
    return (matrix, types.Array(f, 1, "C"), matrix, matrix, types.int64, f)


# The drivers' fused loss-gradient: loss_grad, called by symbol (compiled once per dtype for every driver).
loss_block = SeparatelyCompiled(loss_grad, _loss_signature)


def _transform_signature(f):
    matrix = types.Array(f, 2, "C")
    return (matrix, matrix)


# The drivers' output transform: the loss's own (above), called by symbol (forward_pass's predict and
# predict-and-loss versions share it), a slot filled on request (see _jit): the CPU backend fills its trainer's
# loss's before a predict. output_transform (the loss a run-time code) compiled in 0.56 s, the softmax one alone in
# 0.42 s, on this process's side of a cold first predict (AMD EPYC Zen 4).
identity_block = SeparatelyCompiled(_identity_block, _transform_signature, on_request=True)
sigmoid_block = SeparatelyCompiled(_sigmoid_block, _transform_signature, on_request=True)
exp_block = SeparatelyCompiled(_exp_block, _transform_signature, on_request=True)
softmax_block = SeparatelyCompiled(_softmax_block, _transform_signature, on_request=True)
_TRANSFORM_BLOCKS = {MSE: identity_block, BINARY_CROSS_ENTROPY: sigmoid_block, POISSON: exp_block,
                     SOFTMAX_CROSS_ENTROPY: softmax_block}


def transform_for(loss) -> SeparatelyCompiled:
    """The drivers' output transform of the loss code ``loss`` (a slot filled on request)."""
    return _TRANSFORM_BLOCKS[int(loss)]


@cpu_jit(nrt=False, **FAST)
def clip_grad_norm(grads, max_norm):
    """Scale grads (P,) in place as torch.nn.utils.clip_grad_norm_(params, max_norm) does (one 2-norm over all
    parameters, summed in float64); returns the norm. Serial (deterministic for any thread count): about
    0.5 ns a parameter, 1 ms on W4's 2.1 M beside a 35 ms step."""
    total = 0.0
    for i in range(grads.shape[0]):
        g = np.float64(grads[i])
        total += g * g
    coefficient = clip_coefficient(total, max_norm)
    if coefficient != 1.0:
        scale = grads.dtype.type(coefficient)
        for i in range(grads.shape[0]):
            grads[i] *= scale
    return math.sqrt(total)


# The update loops as the optimizer step calls them: by symbol, each compiled once per dtype (the public kernels,
# Python entry point included) instead of linked into the step, where LLVM optimised and generated their code
# again. Leaves of the drivers' call tree, so a cold fit's helper can compile them beside the step.
def _sgd_signature(f):
    vector = types.Array(f, 1, "C")
    return (vector, vector, vector, f, f, f, f, types.boolean, types.boolean)


def _adam_signature(f):
    vector = types.Array(f, 1, "C")
    return (vector, vector, vector, vector) + (f,) * 8


def _clip_signature(f):
    return (types.Array(f, 1, "C"), types.float64)


sgd_update_by_symbol = SeparatelyCompiled(sgd_update, _sgd_signature)
adam_update_by_symbol = SeparatelyCompiled(adam_update, _adam_signature)
clip_grad_norm_by_symbol = SeparatelyCompiled(clip_grad_norm, _clip_signature, returns=types.float64)


def _optimizer_signature(f):
    vector = types.Array(f, 1, "C")
    return (vector, types.Array(f, 2, "C"), vector, types.float64, types.int64, types.Array(types.float64, 1, "C"),
            types.int64)


@cpu_jit(nrt=False)
def _optimizer_step(params, opt_state, grads, lr, optimizer, hyper, step):
    """One optimizer update of the flat params (P,) in place; ``step`` counts from 1 (torch's state['step']).
    With hyper[H_CLIP] > 0 the gradient is first clipped to that norm (clip_grad_norm: overwrites grads), so
    before SGD's and Adam's L2 term, as clip_grad_norm_ between backward() and step() is in torch.

    opt_state (2, P): SGD's momentum buffer in row 0; Adam's (and AdamW's) exp_avg and exp_avg_sq in rows 0 and 1.
    hyper: float64 vector indexed by pointwise.H_*; bias corrections are formed in float64, then cast.
    The update loops stay compiled functions of their own (sgd_update, adam_update): inlined here, the SGD loop
    ran 35x slower (9610 parameters: 92 us against 2.6 us, AMD EPYC Zen 4), whatever the fast-math flags. Called
    by symbol (see sgd_update_by_symbol): this function's cold compile went from 0.67 to 0.21 s (AMD EPYC Zen 4).
    """
    dtype = params.dtype.type
    if hyper[H_CLIP] > 0.0:
        clip_grad_norm_by_symbol(grads, hyper[H_CLIP])
    weight_decay = dtype(hyper[H_WEIGHT_DECAY])
    if optimizer != SGD:
        beta1 = hyper[H_BETA1]
        beta2 = hyper[H_BETA2]
        step_size = lr / (1.0 - beta1 ** step)
        sqrt_bc2 = np.sqrt(1.0 - beta2 ** step)
        l2, decay = adam_decay_terms(optimizer, lr, hyper[H_WEIGHT_DECAY])
        adam_update_by_symbol(params, opt_state[0], opt_state[1], grads, dtype(lr), dtype(beta1), dtype(beta2),
                              dtype(hyper[H_EPS]), dtype(l2), dtype(step_size), dtype(sqrt_bc2), dtype(decay))
    else:
        sgd_update_by_symbol(params, opt_state[0], grads, dtype(lr), dtype(hyper[H_MOMENTUM]),
                             dtype(hyper[H_DAMPENING]), weight_decay, hyper[H_NESTEROV] != 0.0, step == 1)


optimizer_step = SeparatelyCompiled(_optimizer_step, _optimizer_signature)


@inline
def start_epoch(backup, params, opt_state):
    # backup (3, P) = params (P,) and opt_state's two rows (2, P): the epoch drivers' copy of an epoch's start,
    # which end_epoch restores where the epoch's loss is not finite
    for i in range(params.shape[0]):
        backup[0, i] = params[i]
        backup[1, i] = opt_state[0, i]
        backup[2, i] = opt_state[1, i]


@inline
def end_epoch(params, opt_state, steps_done, backup, step0, epoch, epoch_loss, target_loss):
    """The epoch drivers' stopping rule after epoch ``epoch`` (counted from 0) of mean loss ``epoch_loss``: where
    it is not finite, params, opt_state and steps_done go back to the epoch's start (backup, see start_epoch, and
    step0) and the epochs completed, ``epoch``, are returned; where it is <= target_loss, ``epoch + 1``; else -1,
    train on. The product engine's driver, the fused narrow kernel and its reference share it."""
    if not np.isfinite(epoch_loss):
        for i in range(params.shape[0]):
            params[i] = backup[0, i]
            opt_state[0, i] = backup[1, i]
            opt_state[1, i] = backup[2, i]
        steps_done[0] = step0
        return epoch
    if epoch_loss <= target_loss:
        return epoch + 1
    return -1


@cpu_jit(nrt=False)
def train_epochs(params, opt_state, steps_done, epoch_losses, X, Y, sample_weights, orders, lrs, net_fields, work_fields,
                 settings):
    """Train ``len(lrs)`` epochs in one call; returns how many completed.

    params (P,), opt_state (2, P), steps_done (1,) int64: updated in place. epoch_losses (E,) float64: written,
    each epoch's mean loss over its samples (each sample's loss under the weights at the time its batch was
    processed). X (n, n_in), Y (n, k). sample_weights (n,) or empty: each batch's loss is then
    sum_i w_i l_i / sum_i w_i (l_i the row's loss: the mean over its outputs for mse and binary cross-entropy),
    each epoch's the same over all n rows; a batch whose weights are all 0 gives a zero gradient (the optimizer
    still steps, as it would on any zero gradient). orders (E, n) int64: each epoch's sample order; an (E, 0)
    array means "in order". lrs (E,) float64: each epoch's learning rate. net_fields, work_fields: a Network
    and a Workspace of batch_size rows as plain tuples (tuple(network(...)): numba's dispatcher types a plain
    tuple in C and a named tuple in Python, 1.4 us a call more; the drivers name the fields again inside).
    settings: (optimizer code, hyper (N_HYPER,) float64, batch_size, target_loss).
    Stops early after an epoch whose loss is not finite (params and opt_state are then restored to that
    epoch's start, and the returned count excludes it) or whose loss is <= target_loss.
    No parallel region runs outside the engine's (explicit copies, see _copy_row).
    """
    optimizer, hyper, batch_size, target_loss = settings
    net = Network(*net_fields)
    work = Workspace(*work_fields)
    n = X.shape[0]
    k = Y.shape[1]
    capacity = work.row_losses.shape[0]
    weighted = sample_weights.shape[0] > 0
    in_order = orders.shape[1] == 0
    backup = work.backup
    for epoch in range(lrs.shape[0]):
        start_epoch(backup, params, opt_state)
        step0 = steps_done[0]
        total = 0.0
        for start in range(0, n, batch_size):
            n_rows = min(batch_size, n - start)
            inputs = activation_view(work.acts, net.sizes, net.unit_offsets, capacity, 0, n_rows)
            batch_targets = work.targets[:n_rows]
            batch_weights = work.weights[:n_rows if weighted else 0]
            # The batch's rows, targets and weights in one loop over its rows (three loops compiled 0.25 s more)
            for r in range(n_rows):
                row = start + r if in_order else orders[epoch, start + r]
                _copy_row(inputs, r, X, row)
                _copy_row(batch_targets, r, Y, row)
                if weighted:
                    batch_weights[r] = sample_weights[row]
            if weighted:
                inv_divisor = params.dtype.type(weighted_inv_divisor(net.loss, batch_weights, k))
            else:
                inv_divisor = params.dtype.type(1.0 / loss_divisor(net.loss, n_rows, k))
            total += batch_grads(params, batch_targets, batch_weights, net, work, inv_divisor, n_rows)
            steps_done[0] += 1
            optimizer_step(params, opt_state, work.grads, lrs[epoch], optimizer, hyper, steps_done[0])
        if weighted:
            epoch_loss = total * weighted_inv_divisor(net.loss, sample_weights, k)
        else:
            epoch_loss = total / loss_divisor(net.loss, n, k)
        epoch_losses[epoch] = epoch_loss
        stopped = end_epoch(params, opt_state, steps_done, backup, step0, epoch, epoch_loss, target_loss)
        if stopped >= 0:
            return stopped
    return lrs.shape[0]


@cpu_jit(nrt=False)
def dataset_grads(grads, X, Y, sample_weights, params, net_fields, work_fields, divisor):
    """Sum of the row losses of X (n, n_in), Y (n, k) divided by ``divisor``, and its exact gradient into
    grads (P,), overwritten. ``divisor`` is loss_divisor(loss, n, k) for the mean over this set, or the
    global batch's divisor when these rows are one process's share of it.

    Works capacity rows at a time (the Workspace's): each chunk's gradient is already scaled by 1 / divisor,
    so the chunks add up to the whole set's gradient. sample_weights (n,) or empty: each row's loss counts w_i
    times (the divisor is then the weighted one: sum of the weights times one row's divisor). net_fields,
    work_fields: plain tuples, as in train_epochs."""
    net = Network(*net_fields)
    work = Workspace(*work_fields)
    n = X.shape[0]
    capacity = work.row_losses.shape[0]
    inv_divisor = params.dtype.type(1.0 / divisor)
    weighted = sample_weights.shape[0] > 0
    for i in range(grads.shape[0]):
        grads[i] = 0
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        _copy_rows(activation_view(work.acts, net.sizes, net.unit_offsets, capacity, 0, n_rows), X, start)
        targets = work.targets[:n_rows]
        _copy_rows(targets, Y, start)
        total += batch_grads(params, targets, sample_weights[start:start + n_rows if weighted else start],
                             net, work, inv_divisor, n_rows)
        for i in range(grads.shape[0]):
            grads[i] += work.grads[i]
    return total / divisor


@cpu_jit(nrt=False)
def forward_pass(out, X, Y, sample_weights, params, net_fields, work_fields):
    """The network's forward pass over all of X (n, n_in), capacity rows at a time (the Workspace's): its
    transformed output written into out (n, k) (predict) unless out is None, and the mean loss against Y
    (n, k) returned unless Y is None (0.0 then); with sample_weights (n,) (not empty) the weighted mean
    sum_i w_i l_i / sum_i w_i (l_i: the row's loss). Both at once for a classifier's evaluate: one pass over the
    data instead of two. numba prunes the branch of an argument typed None before typing it, so each use
    compiles only its own code: predict (Y None) does not wait for the loss to be compiled (waiting for it made a
    cold first predict 1 s slower, AMD EPYC Zen 4). net_fields, work_fields: plain tuples, as in train_epochs."""
    net = Network(*net_fields)
    work = Workspace(*work_fields)
    n = X.shape[0]
    capacity = work.row_losses.shape[0]
    n_layers = net.sizes.shape[0] - 1
    weighted = sample_weights.shape[0] > 0
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        _copy_rows(activation_view(work.acts, net.sizes, net.unit_offsets, capacity, 0, n_rows), X, start)
        logits = _forward(params, net, work, n_rows)
        if out is not None:
            _transform_by_loss(identity_block, sigmoid_block, exp_block, softmax_block, out[start:start + n_rows],
                               logits, net.loss)
        if Y is not None:
            dlogits = activation_view(work.deltas, net.sizes, net.unit_offsets, capacity, n_layers, n_rows)
            targets = work.targets[:n_rows]
            _copy_rows(targets, Y, start)
            row_losses = work.row_losses[:n_rows]
            loss_block(dlogits, row_losses, logits, targets, net.loss, params.dtype.type(1.0))
            if weighted:
                for i in range(n_rows):
                    total += np.float64(sample_weights[start + i]) * np.float64(row_losses[i])
            else:
                for i in range(n_rows):
                    total += row_losses[i]
    if Y is None:
        return total
    if weighted:
        return total * weighted_inv_divisor(net.loss, sample_weights, Y.shape[1])
    return total / loss_divisor(net.loss, n, Y.shape[1])


def _forward_pass_types(f, predicts, scores):
    # forward_pass's argument types as the CPU backend passes them for data of dtype f (out and X writable, Y and
    # the sample weights read-only, the Network and Workspace as plain tuples); tests/test_jit_cache.py checks
    # them against the backend's calls
    matrix = types.Array(f, 2, "C")
    return (matrix if predicts else types.none, matrix, matrix.copy(readonly=True) if scores else types.none,
            types.Array(f, 1, "C", readonly=True), types.Array(f, 1, "C"), types.Tuple(_network_type().types),
            types.Tuple(_workspace_type(f).types))


# The versions of forward_pass a trainer calls after its fit (predict, and the validation scores of a
# classifier or of a regressor), which a helper process compiles beside the fit (see fastbp._jit.DriverVersion).
forward_pass_predict = DriverVersion(forward_pass, lambda f: _forward_pass_types(f, True, False), "predict")
forward_pass_predict_and_loss = DriverVersion(forward_pass, lambda f: _forward_pass_types(f, True, True),
                                              "predict_and_loss")
forward_pass_loss = DriverVersion(forward_pass, lambda f: _forward_pass_types(f, False, True), "loss")
