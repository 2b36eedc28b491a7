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
epilogues) on a packing workspace each call allocates, about the size of the weight; every other kernel
allocates nothing. ``*_naive`` kernels are the serial references the fast ones are tested against.

Above the kernels sit the CPU-only drivers that run a whole step, epoch or many epochs inside one
compiled call (``batch_grads``, ``optimizer_step``, ``train_epochs``, ``predict``, ``dataset_loss``), so
Python is touched once per call rather than once per layer and step.

Parameters live in ONE flat vector (W0, b0, W1, b1, ...; see ``fastbp.layout``): one optimizer update over
it, one buffer to allreduce, few kernel arguments.
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from .._jit import cpu_jit, inline, prefer_wide_vectors
from . import gemm
from .pointwise import (
    BINARY_CROSS_ENTROPY,
    IDENTITY,
    LEAKY_RELU,
    MSE,
    POISSON,
    RELU,
    SIGMOID,
    SGD,
    SOFTMAX_CROSS_ENTROPY,
    TANH,
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
    clip_coefficient,
    exp_fast,
    loss_divisor,
    loss_grad_row,
    output_transform_row,
    sgd_update_one,
    sigmoid,
)

# The public, stable surface (documented in fastbp/kernels/API.md): kernels a user's own numba code may call.
# Everything else here (the transposed-operand and feature-major kernels, the products, the whole-step
# drivers, the tuning constants) is fastbp's own and may change between releases.
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

# Below this many multiply-adds a kernel runs on the calling thread: a prange launch costs microseconds,
# more than small layers take (numba issues #3213, #6568), and far more on a loaded machine, where the
# second thread may wait a time slice to be scheduled. 2^20 multiply-adds take about 15 us on one core.
PARALLEL_MIN_WORK = 1 << 20
# Rows per parallel task (each task owns whole output rows: no races, no atomics).
ROW_BLOCK = 16
# The tiled products run in tasks of GEMM_TASK_ROWS x GEMM_TASK_COLS outputs (2-D, so that a product with
# few rows still splits over both cores). Inside a task, GEMM_COL_BLOCK rows of Bt (a panel: 256 KiB at
# K = 1024) stay in L2 while every 6-row tile of A streams past them, and the task's rows of A (512 KiB at
# K = 1024) stay in L2 across panels. Tasks of 32 rows re-read all of Bt from L3 every 32 rows of C, which
# cost the 512 x 1024 x 1024 product half its speed here.
GEMM_TASK_ROWS = 128
GEMM_TASK_COLS = 128
GEMM_COL_BLOCK = 64
# Up to this many elements (64 KiB of float32) transpose() runs as plain loops instead of 8 x 8 tiles.
SMALL_TRANSPOSE = 1 << 14
# Elements per parallel task in the element-wise and copy loops.
ELEMENT_BLOCK = 1 << 14
# Products smaller than this (multiply-adds) skip the engine's packing workspace: see _small.
SMALL_PRODUCT = 1 << 13
# The floating-point freedoms the fast kernels compile with: reassociation lets LLVM split a dot product
# into vector partial sums (without it no reduction loop vectorises: 8 GFLOP/s instead of 50 here),
# contraction makes FMAs. Not "nnan"/"ninf": the drivers test losses with np.isfinite, which those flags
# would let LLVM fold to True.
FAST_MATH = {"reassoc", "contract", "nsz"}
# error_model="numpy": a division by zero gives inf/nan instead of raising ZeroDivisionError. The check
# numba's default ("python") puts before every division is a branch that stops loops from vectorising
# (sigmoid's 1 / (1 + e): 10 ns per element instead of about 1).
FAST = dict(fastmath=FAST_MATH, error_model="numpy")


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


# --- fast kernels --------------------------------------------------------------------------------------------
@inline
def _dense_forward_rows(out, inp, weight, bias, act, row_start, row_stop):
    # Rows row_start..row_stop of act(inp @ weight + bias): the axpy form (see _axpy_rows) on the weight as
    # stored, then the bias and activation over the rows' block.
    _axpy_rows(out, inp, weight, row_start, row_stop)
    _bias_activate_rows(out, bias, act, row_start, row_stop)


@cpu_jit(parallel=True, **FAST)
def dense_forward_axpy(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten, in the axpy form on the weight as stored (no workspace, any
    layout of inp): dense_forward's path for batches shorter than a tile of the engine (one-row predictions,
    where packing the weight would cost as much as the product) and for operands whose rows are not contiguous."""
    prefer_wide_vectors()
    n_rows = inp.shape[0]
    if n_rows * weight.shape[0] * weight.shape[1] < PARALLEL_MIN_WORK:
        _dense_forward_rows(out, inp, weight, bias, act, 0, n_rows)
        return
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for block in prange(n_blocks):
        start = block * ROW_BLOCK
        _dense_forward_rows(out, inp, weight, bias, act, start, min(start + ROW_BLOCK, n_rows))


@inline
def _axpy_rows(C, A, B, i0, i1):
    # C[i, :] = sum_k A[i, k] * B[k, :] for i0 <= i < i1, overwritten. B (K, N) and C (M, N) C-contiguous; A
    # (M, K) in any layout (a transposed view too: its entries are only ever broadcast). The "axpy" form of a
    # product: every inner loop runs along a contiguous row of B and of C and vectorises whatever K is, so it
    # is the form for a SHORT summed axis, where the NT tile's dot products are mostly horizontal sums (k = 32:
    # 64 x 32 x 128 ran at 30 GFLOP/s NT, 35 here, without the two transposes the NT form needs). Four rows
    # of C share each row of B loaded; their rows stay in L1 across k.
    K = B.shape[0]
    N = B.shape[1]
    zero = C.dtype.type(0.0)
    i = i0
    while i + 4 <= i1:
        for j in range(N):
            C[i, j] = zero
            C[i + 1, j] = zero
            C[i + 2, j] = zero
            C[i + 3, j] = zero
        for k in range(K):
            a0 = A[i, k]
            a1 = A[i + 1, k]
            a2 = A[i + 2, k]
            a3 = A[i + 3, k]
            for j in range(N):
                b = B[k, j]
                C[i, j] += a0 * b
                C[i + 1, j] += a1 * b
                C[i + 2, j] += a2 * b
                C[i + 3, j] += a3 * b
        i += 4
    for ii in range(i, i1):  # the last 1-3 rows
        for j in range(N):
            C[ii, j] = zero
        for k in range(K):
            a = A[ii, k]
            for j in range(N):
                C[ii, j] += a * B[k, j]


@cpu_jit(parallel=True, **FAST)
def matmul_axpy(C, A, B):
    """C = A @ B, overwritten, in the axpy form (see _axpy_rows). A (M, K) in any layout (a transposed view
    too), B (K, N) and C (M, N) C-contiguous; parallel over ROW_BLOCK-row blocks of C above PARALLEL_MIN_WORK
    multiply-adds (each task owns whole rows of C: no races, no atomics)."""
    prefer_wide_vectors()
    n_rows = C.shape[0]
    if n_rows * B.shape[0] * B.shape[1] < PARALLEL_MIN_WORK:
        _axpy_rows(C, A, B, 0, n_rows)
        return
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for block in prange(n_blocks):
        start = block * ROW_BLOCK
        _axpy_rows(C, A, B, start, min(start + ROW_BLOCK, n_rows))


@cpu_jit(**FAST)
def dense_backward_params_axpy(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten, in the axpy form (see _axpy_rows; any
    layout of inp, no workspace): dense_backward_params' path when an operand's rows are not contiguous."""
    prefer_wide_vectors()
    matmul_axpy(dweight, inp.T, dout)
    for j in range(dbias.shape[0]):
        dbias[j] = 0
    for i in range(dout.shape[0]):
        for j in range(dbias.shape[0]):
            dbias[j] += dout[i, j]


@cpu_jit(**FAST)
def dense_backward_input_nt(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten, as NT tiles (rows of dout against rows of weight; see
    _nt_tiles; no workspace): dense_backward_input's path when an operand's rows are not contiguous."""
    prefer_wide_vectors()
    matmul_nt(dinp, dout, weight)
    _scale_by_activation_grad_rows(dinp, inp, inp_act, 0, dout.shape[0])


# --- the vocabulary: the product engine (gemm.py) on a workspace of each call's own ------------------------------
# A vocabulary call cannot be handed the engine's packing buffer (its signature is the CUDA one), so it allocates
# one: np.empty of forward_workspace / backward_*_workspace elements, about the size of the weight (4 MiB for a
# 1024 x 1024 float32 layer), from the allocator's free lists after the first call. fastbp's own drivers pass a
# preallocated buffer to gemm.* instead.
@inline
def _rows_contiguous(a):
    return a.shape[1] <= 1 or a.strides[1] == a.itemsize


@inline
def _small(batch, weight):
    # Below SMALL_PRODUCT multiply-adds the forms that need no workspace are as fast and allocate nothing: an
    # online-learning step (one row, 2-32-1) took 0.92 us on them and 2.06 us on the engine with its buffers.
    return batch * weight.shape[0] * weight.shape[1] < SMALL_PRODUCT


@inline
def _runtime_code(code):
    # An activation code as a plain int64 even when the caller passed a constant (RELU from numba code is a
    # compile-time literal): the engine compiled for a literal code ran 1.2-2.3x slower (Intel Xeon, AVX-512:
    # 147 against 172 GFLOP/s at 512x1024x1024, 43 against 100 at 32x64x128), and would be a second compile.
    return code + 0


@inline
def _check_dense(what, batch_a, batch_b, n_in_a, n_in_b, n_out_a, n_out_b, n_bias):
    if batch_a != batch_b or n_in_a != n_in_b or n_out_a != n_out_b or n_bias != n_out_a:
        raise ValueError(what)


@cpu_jit()
def dense_forward(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten. out (B, n_out), inp (B, n_in), weight (n_in, n_out),
    bias (n_out,); act an activation code.

    The product engine: gemm.dense_forward's register tiles with the bias and activation fused into their
    stores, on a packing workspace this call allocates. Below gemm.TILE_ROWS rows, or when an operand's rows
    are not contiguous, the axpy form on the weight as stored (dense_forward_axpy)."""
    _check_dense("dense_forward: shapes do not match (out (B, n_out), inp (B, n_in), weight (n_in, n_out), "
                 "bias (n_out,))", out.shape[0], inp.shape[0], inp.shape[1], weight.shape[0], out.shape[1],
                 weight.shape[1], bias.shape[0])
    if out.shape[0] < gemm.TILE_ROWS or _small(out.shape[0], weight) or not (
            _rows_contiguous(out) and _rows_contiguous(inp) and _rows_contiguous(weight)) or (
            bias.strides[0] != bias.itemsize):
        if _small(out.shape[0], weight):  # here, not in a call: a one-row step is ~100 ns, a call ~40 of it
            _dense_forward_rows(out, inp, weight, bias, act, 0, out.shape[0])
        else:
            dense_forward_axpy(out, inp, weight, bias, act)
        return
    panels = np.empty(gemm.forward_workspace(weight.shape[0], weight.shape[1], out), out.dtype)
    gemm.dense_forward(out, inp, weight, bias, _runtime_code(act), panels)


@cpu_jit()
def dense_backward_params(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten. dweight (n_in, n_out), dbias (n_out,),
    dout (B, n_out), inp (B, n_in). Every sum runs over the batch in row order: results do not depend on the
    number of threads.

    The product engine (gemm.dense_backward_params) on a workspace this call allocates; when an operand's rows
    are not contiguous (inp a transposed view, say), the axpy form (dense_backward_params_axpy)."""
    _check_dense("dense_backward_params: shapes do not match (dweight (n_in, n_out), dbias (n_out,), "
                 "dout (B, n_out), inp (B, n_in))", dout.shape[0], inp.shape[0], inp.shape[1], dweight.shape[0],
                 dout.shape[1], dweight.shape[1], dbias.shape[0])
    if _small(dout.shape[0], dweight) or not (
            _rows_contiguous(dweight) and _rows_contiguous(dout) and _rows_contiguous(inp)) or (
            dbias.strides[0] != dbias.itemsize):
        if _small(dout.shape[0], dweight):  # inline, as in dense_forward
            _axpy_rows(dweight, inp.T, dout, 0, dweight.shape[0])
            for j in range(dbias.shape[0]):
                dbias[j] = 0
            for i in range(dout.shape[0]):
                for j in range(dbias.shape[0]):
                    dbias[j] += dout[i, j]
        else:
            dense_backward_params_axpy(dweight, dbias, dout, inp)
        return
    panels = np.empty(gemm.backward_params_workspace(dout.shape[0], dweight.shape[0], dweight.shape[1], dweight),
                      dweight.dtype)
    gemm.dense_backward_params(dweight, dbias, dout, inp, panels)


@cpu_jit()
def dense_backward_input(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: the gradient w.r.t. the PREVIOUS layer's
    pre-activation, with that layer's activation derivative (written from its output ``inp``) fused in.
    dinp (B, n_in), dout (B, n_out), weight (n_in, n_out), inp (B, n_in).

    The product engine (gemm.dense_backward_input: weight^T packed once, the derivative fused into the tiles'
    stores) on a workspace this call allocates; when an operand's rows are not contiguous, NT tiles on the
    weight as stored (dense_backward_input_nt)."""
    _check_dense("dense_backward_input: shapes do not match (dinp (B, n_in), dout (B, n_out), "
                 "weight (n_in, n_out), inp (B, n_in))", dinp.shape[0], dout.shape[0], dinp.shape[1],
                 weight.shape[0], dout.shape[1], weight.shape[1], dout.shape[1])
    if inp.shape[0] != dinp.shape[0] or inp.shape[1] != dinp.shape[1]:
        raise ValueError("dense_backward_input: inp must be shaped like dinp (B, n_in)")
    if _small(dout.shape[0], weight) or not (
            _rows_contiguous(dinp) and _rows_contiguous(dout) and _rows_contiguous(weight) and _rows_contiguous(inp)):
        if _small(dout.shape[0], weight):  # inline, as in dense_forward: dot products along weight's rows
            zero = dinp.dtype.type(0.0)
            for i in range(dinp.shape[0]):
                for k in range(dinp.shape[1]):
                    acc = zero
                    for j in range(dout.shape[1]):
                        acc += dout[i, j] * weight[k, j]
                    dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)
        else:
            dense_backward_input_nt(dinp, dout, weight, inp, inp_act)
        return
    panels = np.empty(gemm.backward_input_workspace(weight.shape[0], weight.shape[1], dinp), dinp.dtype)
    gemm.dense_backward_input(dinp, dout, weight, inp, _runtime_code(inp_act), panels)


@cpu_jit()
def dense_backward(dinp, dweight, dbias, dout, inp, weight, inp_act):
    """Both halves of a dense layer's backward pass (see dense_backward_params, dense_backward_input)."""
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)


@cpu_jit(**FAST)
def loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor):
    """Fused loss and gradient, overwritten: dlogits (B, k) = d mean-loss / d logits, row_losses (B,) each
    row's summed loss. logits, targets (B, k); inv_divisor = 1 / loss_divisor(loss, n, k).

    mse, poisson and softmax_cross_entropy are written out over the whole (B, k) block here (the same
    arithmetic as pointwise.loss_grad_row): taking a row view per sample costs a reference-count round trip each, which
    was 44 ns a row, more than the arithmetic, and softmax's exps then run as one vectorised loop over the
    block instead of rows of 10. binary_cross_entropy goes row by row through loss_grad_row."""
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
    elif loss == POISSON:  # exp(z) - t z and (exp(z) - t) / divisor: one loop over the block, exps vectorised
        for i in range(n):
            total = zero
            for j in range(k):
                z = logits[i, j]
                rate = exp_fast(z)
                total += rate - targets[i, j] * z
                dlogits[i, j] = (rate - targets[i, j]) * inv_divisor
            row_losses[i] = total
    elif loss == SOFTMAX_CROSS_ENTROPY:
        # Pass 1: shift each row by its max (stability only); the max waits in row_losses.
        for i in range(n):
            zmax = logits[i, 0]
            for j in range(1, k):
                zmax = max(zmax, logits[i, j])
            row_losses[i] = zmax
            for j in range(k):
                dlogits[i, j] = logits[i, j] - zmax
        # Pass 2: the softmax numerators, one loop over the block.
        flat = dlogits.reshape(n * k)
        for t in range(n * k):
            flat[t] = exp_fast(flat[t])
        # Pass 3: sum_j t_j (logsumexp(z) - z_j) and (softmax * sum(t) - t) / divisor.
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
    else:  # the constant code lets LLVM drop loss_grad_row's other branches (compile time)
        for i in range(n):
            row_losses[i] = loss_grad_row(dlogits[i], logits[i], targets[i], BINARY_CROSS_ENTROPY, inv_divisor)


@cpu_jit(**FAST)
def output_transform(out, logits, loss):
    """out (B, k) = the loss's output transform of logits (B, k): identity, sigmoid, softmax or exp."""
    prefer_wide_vectors()
    for i in range(logits.shape[0]):
        output_transform_row(out[i], logits[i], loss)


@cpu_jit(**FAST)
def sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD step over flat vectors (P,), in place. Scalars in the parameters' dtype.
    Serial: about 1 ns a parameter, ~1% of a W4 step; a parallel path cost a second of cold compile."""
    prefer_wide_vectors()
    for i in range(params.shape[0]):
        sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov, first_step)


@cpu_jit(**FAST)
def adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2, decay):
    """torch.optim.Adam (decay = 1) or AdamW (weight_decay = 0, decay = 1 - lr * wd) step over flat vectors
    (P,), in place; see pointwise.adam_update_one. Scalars in the parameters' dtype. Serial."""
    prefer_wide_vectors()
    for i in range(params.shape[0]):
        adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                        step_size, sqrt_bias_correction2, decay)


@cpu_jit()
def gather_rows(out, source, order, start):
    """out[r] = source[order[start + r]] for r < out.shape[0], overwritten: one mini-batch, contiguous."""
    for r in range(out.shape[0]):
        src = order[start + r]
        for j in range(source.shape[1]):
            out[r, j] = source[src, j]


# --- tiled products: C = A @ Bt.T with both operands contiguous along the summed axis ---------------------
# The "NT" form is the one LLVM vectorises reliably: every one of the 24 accumulators of a 6x4 tile is a
# dot product over a contiguous k, so the k loop becomes packed FMAs (checked with inspect_asm: 24 vfmadd on
# zmm registers per 10 loads) and the accumulators stay in registers (24 of the 32 zmm registers). The forms
# that vectorise over j (C[i, :] += a * B[k, :]) reached half of this here, as they load and store C in every
# k iteration. 6x4 against the 4x4 tile (16 FMAs per 8 loads), one thread, zmm, GFLOP/s, medians of 5
# alternating rounds: 76 vs 66 at 512x1024x1024, 72 vs 65 at 128x784x256, 55 vs 53 at 784x128x256 (OpenBLAS:
# 90, 86, 88). The k loops run over range(K) from 0: with a non-zero start numba cannot prove the index
# non-negative, keeps its wraparound select, and the loop runs about 8x slower.
@inline
def _nt_tiles(C, A, Bt, i0, i1, j0, j1):
    # C[i, j] = dot(A[i, :], Bt[j, :]) for i0 <= i < i1, j0 <= j < j1, overwritten. A (M, K), Bt (N, K).
    K = A.shape[1]
    zero = C.dtype.type(0.0)
    i = i0
    while i + 6 <= i1:
        j = j0
        while j + 4 <= j1:
            c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = zero
            c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = zero
            for k in range(K):
                b0 = Bt[j, k]
                b1 = Bt[j + 1, k]
                b2 = Bt[j + 2, k]
                b3 = Bt[j + 3, k]
                a = A[i, k]
                c00 += a * b0
                c01 += a * b1
                c02 += a * b2
                c03 += a * b3
                a = A[i + 1, k]
                c10 += a * b0
                c11 += a * b1
                c12 += a * b2
                c13 += a * b3
                a = A[i + 2, k]
                c20 += a * b0
                c21 += a * b1
                c22 += a * b2
                c23 += a * b3
                a = A[i + 3, k]
                c30 += a * b0
                c31 += a * b1
                c32 += a * b2
                c33 += a * b3
                a = A[i + 4, k]
                c40 += a * b0
                c41 += a * b1
                c42 += a * b2
                c43 += a * b3
                a = A[i + 5, k]
                c50 += a * b0
                c51 += a * b1
                c52 += a * b2
                c53 += a * b3
            C[i, j] = c00
            C[i, j + 1] = c01
            C[i, j + 2] = c02
            C[i, j + 3] = c03
            C[i + 1, j] = c10
            C[i + 1, j + 1] = c11
            C[i + 1, j + 2] = c12
            C[i + 1, j + 3] = c13
            C[i + 2, j] = c20
            C[i + 2, j + 1] = c21
            C[i + 2, j + 2] = c22
            C[i + 2, j + 3] = c23
            C[i + 3, j] = c30
            C[i + 3, j + 1] = c31
            C[i + 3, j + 2] = c32
            C[i + 3, j + 3] = c33
            C[i + 4, j] = c40
            C[i + 4, j + 1] = c41
            C[i + 4, j + 2] = c42
            C[i + 4, j + 3] = c43
            C[i + 5, j] = c50
            C[i + 5, j + 1] = c51
            C[i + 5, j + 2] = c52
            C[i + 5, j + 3] = c53
            j += 4
        i += 6
    # What the 6x4 tiles left: the last 1-3 columns of the tiled rows, and the last 1-5 rows (all columns),
    # as 1x4 tiles and single dot products (one compiled loop each; a few percent of a product's work).
    for ii in range(i0, i1):
        jj = j0 if ii >= i else j0 + (j1 - j0) // 4 * 4
        while jj + 4 <= j1:
            c0 = c1 = c2 = c3 = zero
            for k in range(K):
                a = A[ii, k]
                c0 += a * Bt[jj, k]
                c1 += a * Bt[jj + 1, k]
                c2 += a * Bt[jj + 2, k]
                c3 += a * Bt[jj + 3, k]
            C[ii, jj] = c0
            C[ii, jj + 1] = c1
            C[ii, jj + 2] = c2
            C[ii, jj + 3] = c3
            jj += 4
        while jj < j1:
            c = zero
            for k in range(K):
                c += A[ii, k] * Bt[jj, k]
            C[ii, jj] = c
            jj += 1


@inline
def _nt_block(C, A, Bt, i0, i1, j0, j1):
    # C[i0:i1, j0:j1] of C = A @ Bt.T, GEMM_COL_BLOCK rows of Bt at a time (they stay in cache for the task).
    for jb in range(j0, j1, GEMM_COL_BLOCK):
        _nt_tiles(C, A, Bt, i0, i1, jb, min(jb + GEMM_COL_BLOCK, j1))


@inline
def _bias_activate_rows(out, bias, act, i0, i1):
    # out[i, :] = act(out[i, :] + bias) for rows i0..i1. The bias is added row by row; the activation then
    # runs as ONE loop over the rows' contiguous block: rows of 10-16 numbers are shorter than a vectorised
    # loop's step (vector width x interleave), so a per-row loop would only ever run its scalar remainder.
    # The branch on act sits outside the loops so each loop vectorises (sigmoid through exp_fast).
    n = out.shape[1]
    for i in range(i0, i1):
        for j in range(n):
            out[i, j] += bias[j]
    if act == IDENTITY:
        return
    _activate_flat(out.reshape(out.shape[0] * n)[i0 * n:i1 * n], act)


@cpu_jit(**FAST)
def _activate_flat(flat, act):
    # flat[t] = act(flat[t]) over a contiguous block, one vectorised loop per activation.
    # A compiled function, not an inline helper: numba deep-copies an inlined function's IR at every call
    # site, and every inlining caller above it copies that copy again; inlined here, this function's four
    # loops (sigmoid's exp_fast and activate() in them) cost a cold fit 4 s of the 16 s numba spent inlining
    # (AMD EPYC Zen 4). Called once per row block, so the call itself costs nothing measurable.
    prefer_wide_vectors()
    zero = flat.dtype.type(0.0)
    if act == IDENTITY:
        return
    if act == RELU:
        for t in range(flat.shape[0]):
            z = flat[t]
            flat[t] = z if z > zero else zero
    elif act == SIGMOID:
        for t in range(flat.shape[0]):
            flat[t] = sigmoid(flat[t])
    elif act == TANH:  # each branch passes activate() a constant code, so only that case is compiled
        for t in range(flat.shape[0]):
            flat[t] = activate(flat[t], TANH)
    else:
        for t in range(flat.shape[0]):
            flat[t] = activate(flat[t], LEAKY_RELU)


@cpu_jit(**FAST)
def _scale_by_activation_grad_rows(dinp, inp, act, i0, i1):
    # dinp[i, :] *= act'(from the output inp[i, :]) for rows i0..i1, as one loop over the contiguous block.
    # Compiled on its own, as _activate_flat (and for the same reason).
    prefer_wide_vectors()
    n = dinp.shape[1]
    zero = dinp.dtype.type(0.0)
    if act == IDENTITY:
        return
    flat = dinp.reshape(dinp.shape[0] * n)[i0 * n:i1 * n]
    flat_inp = inp.reshape(inp.shape[0] * n)[i0 * n:i1 * n]
    if act == RELU:
        for t in range(flat.shape[0]):
            flat[t] = flat[t] if flat_inp[t] > zero else zero
    elif act == SIGMOID:
        for t in range(flat.shape[0]):
            flat[t] *= activation_grad(flat_inp[t], SIGMOID)
    elif act == TANH:
        for t in range(flat.shape[0]):
            flat[t] *= activation_grad(flat_inp[t], TANH)
    else:
        for t in range(flat.shape[0]):
            flat[t] *= activation_grad(flat_inp[t], LEAKY_RELU)


@cpu_jit(**FAST)
def matmul_nt_block(C, A, Bt, row_start, row_stop, col_start, col_stop):
    """C[row_start:row_stop, col_start:col_stop] of C = A @ Bt.T, overwritten, on the calling thread.

    The one compiled copy of the register-tiled loops: matmul_nt's serial path and every parallel task
    call it, and the dense kernels call matmul_nt, so the large unrolled, vectorised tile code is compiled
    once per dtype rather than once per caller and path (cold compile of a fit: 54 s -> see the README).
    Vectorised with 512-bit registers where the CPU has them (see prefer_wide_vectors)."""
    prefer_wide_vectors()
    _nt_block(C, A, Bt, row_start, row_stop, col_start, col_stop)


@cpu_jit(parallel=True, **FAST)
def matmul_nt(C, A, Bt):
    """C = A @ Bt.T, overwritten. A (M, K), Bt (N, K), C (M, N), all C-contiguous; parallel over
    GEMM_TASK_ROWS x GEMM_TASK_COLS blocks of C above PARALLEL_MIN_WORK multiply-adds (each task owns its
    block of C, and sums over all of k: no races, and results do not depend on the number of threads)."""
    n_rows = A.shape[0]
    n_cols = Bt.shape[0]
    # A literal 0 would be typed Literal[int] and compile a second copy of the tile code.
    zero = n_rows - n_rows
    if n_rows * A.shape[1] * n_cols < PARALLEL_MIN_WORK:
        matmul_nt_block(C, A, Bt, zero, n_rows, zero, n_cols)
        return
    row_blocks = (n_rows + GEMM_TASK_ROWS - 1) // GEMM_TASK_ROWS
    col_blocks = (n_cols + GEMM_TASK_COLS - 1) // GEMM_TASK_COLS
    for task in prange(row_blocks * col_blocks):
        i0 = (task // col_blocks) * GEMM_TASK_ROWS
        j0 = (task % col_blocks) * GEMM_TASK_COLS
        matmul_nt_block(C, A, Bt, zero + i0, min(i0 + GEMM_TASK_ROWS, n_rows), zero + j0,
                        min(j0 + GEMM_TASK_COLS, n_cols))


@inline
def _transpose_rows(out, inp, i0, i1):
    # out[:, i] = inp[i, :] for rows i0..i1, in tiles of 16 rows x 64 columns, each tile written column by
    # column of inp: every output row segment (16 floats, one cache line) is written contiguously while the
    # 16 input rows stream through L1. Measured here (float32, 2 threads, us): 512x1024 612 -> 257,
    # 1024x1024 925 -> 538, 784x256 206 -> 80 against the previous 8x8 tiles written row by row of inp (whose
    # strided writes touched a new cache line per element). Indices run as uint64 from the tile's start: with
    # a signed, non-zero start numba keeps a negative-index wraparound select on every access.
    n = inp.shape[1]
    for ib in range(i0, i1, 16):
        ie = min(ib + 16, i1)
        for jb in range(0, n, 64):
            je = min(jb + 64, n)
            for j in range(np.uint64(jb), np.uint64(je)):
                for i in range(np.uint64(ib), np.uint64(ie)):
                    out[j, i] = inp[i, j]


@cpu_jit(parallel=True, **FAST)
def transpose(out, inp):
    """out (n, m) = inp (m, n).T, overwritten; parallel over row blocks of inp for large arrays."""
    prefer_wide_vectors()
    m = inp.shape[0]
    n = inp.shape[1]
    if m * n <= SMALL_TRANSPOSE:
        # Small blocks stay in L1/L2: plain loops, each output row written contiguously, beat the (then 8 x 8)
        # tiles' set-up by 2-4x (64 x 128: 3.4 us against 9.3; 100 x 16: 0.5 against 1.8).
        for j in range(n):
            for i in range(m):
                out[j, i] = inp[i, j]
        return
    if m * n < PARALLEL_MIN_WORK:
        _transpose_rows(out, inp, 0, m)
        return
    n_blocks = (m + 63) // 64
    for block in prange(n_blocks):
        _transpose_rows(out, inp, block * 64, min(block * 64 + 64, m))


@cpu_jit(**FAST)
def dense_forward_t(out, inp, weight_t, bias, act):
    """out = act(inp @ weight_t.T + bias), overwritten: dense_forward with the weight given TRANSPOSED, so
    the product is the vectorised NT form. inp (B, n_in), weight_t (n_out, n_in), bias (n_out,), out (B, n_out).
    The bias and activation pass is serial: it touches B * n_out numbers once, n_in times less than the
    product (and keeping it out of the parallel tasks keeps one compiled copy of it)."""
    prefer_wide_vectors()
    matmul_nt(out, inp, weight_t)
    _bias_activate_rows(out, bias, act, 0, inp.shape[0])


@cpu_jit(**FAST)
def dense_backward_params_t(dweight, dbias, dout_t, inp_t):
    """dweight = inp_t @ dout_t.T and dbias = dout_t.sum(1), overwritten: dense_backward_params with both
    operands given TRANSPOSED (batch along the contiguous axis), so the sums over the batch are contiguous
    dot products. dout_t (n_out, B), inp_t (n_in, B), dweight (n_in, n_out), dbias (n_out,).
    Sums run in a fixed order: results do not depend on the number of threads."""
    prefer_wide_vectors()
    matmul_nt(dweight, inp_t, dout_t)
    zero = dbias.dtype.type(0.0)
    for j in range(dout_t.shape[0]):
        acc = zero
        for i in range(dout_t.shape[1]):
            acc += dout_t[j, i]
        dbias[j] = acc


# --- feature-major kernels for narrow networks --------------------------------------------------------------
# A network whose layers are all at most NARROW_MAX_WIDTH wide (W1: 1-16-1) runs its whole step on
# TRANSPOSED activations and deltas, (units, batch): every inner loop then runs over the batch, the longest
# contiguous axis there is, instead of over rows of 1-16 numbers (shorter than one vector step), and no
# weight or activation is transposed inside the step (only the narrow input and output blocks).
NARROW_MAX_WIDTH = 32


def path_flags(sizes):
    """The ``narrow, wide`` arguments of batch_grads / train_epochs / dataset_grads for layer widths
    ``sizes``: (1, None) when every layer is at most NARROW_MAX_WIDTH wide (the feature-major step), else
    (None, 1). The TYPES decide: numba prunes a branch on a None-typed argument at compile time, so a fit
    compiles one path, not both (compiling both cost a cold first fit about 9 s here)."""
    return (1, None) if int(max(sizes)) <= NARROW_MAX_WIDTH else (None, 1)


@cpu_jit(**FAST)
def dense_forward_fm(out_t, inp_t, weight, bias, act):
    """out_t = act(weight.T @ inp_t + bias[:, None]), overwritten: dense_forward on feature-major
    (transposed) activations. inp_t (n_in, B), weight (n_in, n_out), bias (n_out,), out_t (n_out, B).
    Serial; each output sums over k in order (results do not depend on threads)."""
    prefer_wide_vectors()
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    n = inp_t.shape[1]
    for j in range(n_out):
        b = bias[j]
        for i in range(n):
            out_t[j, i] = b
        for k in range(n_in):
            w = weight[k, j]
            for i in range(n):
                out_t[j, i] += w * inp_t[k, i]
    _activate_flat(out_t.reshape(n_out * n), act)


@cpu_jit(**FAST)
def dense_backward_input_fm(dinp_t, dout_t, weight, inp_t, inp_act):
    """dinp_t = (weight @ dout_t) * act'(inp_t), overwritten: dense_backward_input on feature-major
    (transposed) arrays. dout_t (n_out, B), weight (n_in, n_out), inp_t and dinp_t (n_in, B). Serial."""
    prefer_wide_vectors()
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    n = dout_t.shape[1]
    zero = dinp_t.dtype.type(0.0)
    for k in range(n_in):
        for i in range(n):
            dinp_t[k, i] = zero
        for j in range(n_out):
            w = weight[k, j]
            for i in range(n):
                dinp_t[k, i] += w * dout_t[j, i]
    _scale_by_activation_grad_rows(dinp_t, inp_t, inp_act, 0, n_in)


@inline
def _transpose_small(out, inp):
    # out (n, m) = inp (m, n).T for narrow blocks (plain loops: the tiled transpose's set-up costs more).
    for j in range(inp.shape[1]):
        for i in range(inp.shape[0]):
            out[j, i] = inp[i, j]


# --- views into flat buffers ---------------------------------------------------------------------------------
@inline
def weight_view(params, sizes, param_offsets, layer):
    """Layer ``layer``'s weight, (sizes[layer], sizes[layer + 1]), as a view into the flat vector ``params``
    (P,) laid out by fastbp.layout.Layout (W0, b0, W1, b1, ...); works on any vector laid out like it (the
    gradients). Inline: callable from numba code only."""
    start = param_offsets[layer]
    return params[start:start + sizes[layer] * sizes[layer + 1]].reshape((sizes[layer], sizes[layer + 1]))


@inline
def bias_view(params, sizes, param_offsets, layer):
    """Layer ``layer``'s bias, (sizes[layer + 1],), as a view into the flat vector ``params`` (P,) (see
    weight_view). Inline: callable from numba code only."""
    start = param_offsets[layer] + sizes[layer] * sizes[layer + 1]
    return params[start:start + sizes[layer + 1]]


@inline
def activation_view(buffer, sizes, unit_offsets, capacity, layer, n_rows):
    """Layer ``layer``'s (n_rows, sizes[layer]) slot of a workspace buffer of ``capacity`` rows."""
    start = capacity * unit_offsets[layer]
    return buffer[start:start + n_rows * sizes[layer]].reshape((n_rows, sizes[layer]))


@inline
def activation_view_t(buffer, sizes, unit_offsets, capacity, layer, n_rows):
    """Layer ``layer``'s slot of a workspace buffer, TRANSPOSED: (sizes[layer], n_rows)."""
    start = capacity * unit_offsets[layer]
    return buffer[start:start + n_rows * sizes[layer]].reshape((sizes[layer], n_rows))


def scratch_size(n_params, capacity, n_units):
    """Length of the ``scratch`` workspace of batch_grads / train_epochs / dataset_grads: the feature-major
    step's transposed weights (P) and transposed copies of the activations and deltas (capacity * sum(sizes)
    each), or, on the wide path, the product engine's panels (gemm.workspace_size of any one layer; bounded
    here from P and sum(sizes) with the widest tile, so the bound holds for every layer, dtype and CPU)."""
    nr = GEMM_MAX_TILE_COLUMNS
    engine = max(n_params + n_units * (nr - 1), (capacity + 1) * (n_units + nr + 6))
    return max(n_params + 2 * capacity * n_units, engine)


# The widest tile of the product engine (float32 with 512-bit vectors: 4 vectors of 16; gemm.tile_columns).
GEMM_MAX_TILE_COLUMNS = 64


@inline
def _copy_rows(out, source, start):
    # out[r, :] = source[start + r, :]: explicit loops (a slice assignment in a parallel=True function is a
    # parfor, i.e. a thread launch, which costs more than the copy for small batches).
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = source[start + r, j]


# --- drivers: a step, an epoch, many epochs in one compiled call ---------------------------------------------
@cpu_jit()
def forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows):
    """Forward through every layer; acts' layer-0 slot must hold the input rows. Returns the logits view."""
    n_layers = sizes.shape[0] - 1
    for layer in range(n_layers):
        inp = activation_view(acts, sizes, unit_offsets, capacity, layer, n_rows)
        out = activation_view(acts, sizes, unit_offsets, capacity, layer + 1, n_rows)
        dense_forward(out, inp, weight_view(params, sizes, param_offsets, layer),
                      bias_view(params, sizes, param_offsets, layer), act_codes[layer])
    return activation_view(acts, sizes, unit_offsets, capacity, n_layers, n_rows)


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


@inline
def _batch_loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor, row_weights, n_rows):
    # The fused loss-gradient of a batch, and the float64 sum of its row losses. With row_weights (n_rows,),
    # row i's gradient is scaled by w_i and its loss counts w_i times (inv_divisor then holds 1 / the
    # batch's weighted divisor); None-typed row_weights prune that branch at compile time.
    loss_grad(dlogits, row_losses[:n_rows], logits, targets, loss, inv_divisor)
    total = 0.0
    if row_weights is None:
        for i in range(n_rows):
            total += row_losses[i]
    else:
        k = dlogits.shape[1]
        for i in range(n_rows):
            w = row_weights[i]
            total += np.float64(w) * np.float64(row_losses[i])
            for j in range(k):
                dlogits[i, j] *= w
    return total


@cpu_jit()
def batch_grads(grads, acts, deltas, row_losses, scratch, params, targets, sizes, param_offsets, unit_offsets,
                capacity, act_codes, loss, inv_divisor, n_rows, narrow, wide, row_weights=None):
    """One forward and backward pass on the n_rows input rows in acts' layer-0 slot; grads (P,) overwritten
    with d(sum of row losses * inv_divisor)/d params. Returns the float64 sum of the row losses.
    row_weights (n_rows,) or None: the sample weights of the rows (each row's loss counts w_i times).

    scratch (scratch_size(P, capacity, sum(sizes)),): the product engine's panels (wide path) or the
    feature-major step's transposed copies (batch_grads_fm).
    narrow, wide: path_flags(sizes); narrow not None runs the feature-major step instead (batch_grads_fm)."""
    n_layers = sizes.shape[0] - 1
    # narrow, wide = path_flags(sizes): numba prunes a branch on an argument only when it is None-typed, so
    # each specialisation drops the other path at compile time (a fit compiles one path, not both).
    if narrow is not None:
        return batch_grads_fm(grads, acts, deltas, row_losses, scratch, params, targets, sizes, param_offsets,
                              unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows, row_weights)
    if wide is None:  # not reached at run time (one of the two is None); makes the rest dead code when narrow
        return 0.0
    # The product engine (fastbp/kernels/gemm.py): register-blocked tiles on packed panels, with the bias and
    # activation fused into the forward's stores and the activation derivative into the input gradient's;
    # operands as stored (no transposes of activations). scratch holds its panels, reused by every product.
    for layer in range(n_layers):
        gemm.dense_forward(activation_view(acts, sizes, unit_offsets, capacity, layer + 1, n_rows),
                           activation_view(acts, sizes, unit_offsets, capacity, layer, n_rows),
                           weight_view(params, sizes, param_offsets, layer),
                           bias_view(params, sizes, param_offsets, layer), act_codes[layer], scratch)
    logits = activation_view(acts, sizes, unit_offsets, capacity, n_layers, n_rows)
    dlogits = activation_view(deltas, sizes, unit_offsets, capacity, n_layers, n_rows)
    total = _batch_loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor, row_weights, n_rows)
    for layer in range(n_layers - 1, -1, -1):
        dout = activation_view(deltas, sizes, unit_offsets, capacity, layer + 1, n_rows)
        inp = activation_view(acts, sizes, unit_offsets, capacity, layer, n_rows)
        gemm.dense_backward_params(weight_view(grads, sizes, param_offsets, layer),
                                   bias_view(grads, sizes, param_offsets, layer), dout, inp, scratch)
        if layer > 0:  # the input layer's gradient is never needed
            gemm.dense_backward_input(activation_view(deltas, sizes, unit_offsets, capacity, layer, n_rows), dout,
                                      weight_view(params, sizes, param_offsets, layer), inp, act_codes[layer - 1],
                                      scratch)
    return total


@cpu_jit()
def batch_grads_fm(grads, acts, deltas, row_losses, scratch, params, targets, sizes, param_offsets,
                   unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows, row_weights=None):
    """batch_grads for narrow networks (see NARROW_MAX_WIDTH), same arguments and results: the step runs
    on the feature-major copies in scratch; acts and deltas carry only the input, logits and their
    gradient batch-major (for loss_grad)."""
    n_layers = sizes.shape[0] - 1
    n_params = params.shape[0]
    block = capacity * unit_offsets[n_layers + 1]
    acts_t = scratch[n_params:n_params + block]
    deltas_t = scratch[n_params + block:n_params + 2 * block]
    _transpose_small(activation_view_t(acts_t, sizes, unit_offsets, capacity, 0, n_rows),
                     activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows))
    for layer in range(n_layers):
        dense_forward_fm(activation_view_t(acts_t, sizes, unit_offsets, capacity, layer + 1, n_rows),
                         activation_view_t(acts_t, sizes, unit_offsets, capacity, layer, n_rows),
                         weight_view(params, sizes, param_offsets, layer),
                         bias_view(params, sizes, param_offsets, layer), act_codes[layer])
    logits = activation_view(acts, sizes, unit_offsets, capacity, n_layers, n_rows)
    _transpose_small(logits, activation_view_t(acts_t, sizes, unit_offsets, capacity, n_layers, n_rows))
    dlogits = activation_view(deltas, sizes, unit_offsets, capacity, n_layers, n_rows)
    total = _batch_loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor, row_weights, n_rows)
    _transpose_small(activation_view_t(deltas_t, sizes, unit_offsets, capacity, n_layers, n_rows), dlogits)
    for layer in range(n_layers - 1, -1, -1):
        dout_t = activation_view_t(deltas_t, sizes, unit_offsets, capacity, layer + 1, n_rows)
        inp_t = activation_view_t(acts_t, sizes, unit_offsets, capacity, layer, n_rows)
        dense_backward_params_t(weight_view(grads, sizes, param_offsets, layer),
                                bias_view(grads, sizes, param_offsets, layer), dout_t, inp_t)
        if layer > 0:
            dense_backward_input_fm(activation_view_t(deltas_t, sizes, unit_offsets, capacity, layer, n_rows),
                                    dout_t, weight_view(params, sizes, param_offsets, layer), inp_t,
                                    act_codes[layer - 1])
    return total


@cpu_jit(**FAST)
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


@cpu_jit()
def optimizer_step(params, opt_state, grads, lr, optimizer, hyper, step):
    """One optimizer update of the flat params (P,) in place; ``step`` counts from 1 (torch's state['step']).
    With hyper[H_CLIP] > 0 the gradient is first clipped to that norm (clip_grad_norm: overwrites grads), so
    before SGD's and Adam's L2 term, as clip_grad_norm_ between backward() and step() is in torch.

    opt_state (2, P): SGD's momentum buffer in row 0; Adam's (and AdamW's) exp_avg and exp_avg_sq in rows 0 and 1.
    hyper: float64 vector indexed by pointwise.H_*; bias corrections are formed in float64, then cast.
    """
    dtype = params.dtype.type
    if hyper[H_CLIP] > 0.0:
        clip_grad_norm(grads, hyper[H_CLIP])
    weight_decay = dtype(hyper[H_WEIGHT_DECAY])
    if optimizer != SGD:
        beta1 = hyper[H_BETA1]
        beta2 = hyper[H_BETA2]
        step_size = lr / (1.0 - beta1 ** step)
        sqrt_bc2 = np.sqrt(1.0 - beta2 ** step)
        l2, decay = adam_decay_terms(optimizer, lr, hyper[H_WEIGHT_DECAY])
        adam_update(params, opt_state[0], opt_state[1], grads, dtype(lr), dtype(beta1), dtype(beta2),
                    dtype(hyper[H_EPS]), dtype(l2), dtype(step_size), dtype(sqrt_bc2), dtype(decay))
    else:
        sgd_update(params, opt_state[0], grads, dtype(lr), dtype(hyper[H_MOMENTUM]), dtype(hyper[H_DAMPENING]),
                   weight_decay, hyper[H_NESTEROV] != 0.0, step == 1)


@cpu_jit()
def train_epochs(params, opt_state, steps_done, grads, acts, deltas, targets_batch, row_losses, backup, scratch,
                 X, Y, orders, lrs, epoch_losses,
                 sizes, param_offsets, unit_offsets, act_codes, loss, optimizer, hyper, batch_size, target_loss, narrow,
                 wide, sample_weights=None, weights_batch=None):
    """Train ``len(lrs)`` epochs in one call; returns how many completed.

    sample_weights (n,) or None, with weights_batch (batch_size,) its gather buffer: each batch's loss is
    sum_i w_i l_i / sum_i w_i (l_i the row's loss: the mean over its outputs for mse and binary cross-entropy),
    each epoch's the same over all n rows; a batch whose weights are all 0 gives a zero gradient (the
    optimizer still steps, as it would on any zero gradient).
    params (P,), opt_state (2, P), steps_done (1,) int64: updated in place. X (n, n_in), Y (n, k).
    orders (E, n) int64: each epoch's sample order; an (E, 0) array means "in order" (full batch).
    lrs (E,) float64: each epoch's learning rate. epoch_losses (E,) float64: written, each epoch's mean loss
    over its samples (each sample's loss under the weights at the time its batch was processed).
    Workspace: grads (P,), acts and deltas (batch_size * sum(sizes),), targets_batch (batch_size, k),
    row_losses (batch_size,), backup (3, P), scratch (scratch_size(P, batch_size, sum(sizes)),).
    Stops early after an epoch whose loss is not finite (params and opt_state are then restored to that
    epoch's start, and the returned count excludes it) or whose loss is <= target_loss.
    No parallel region runs outside the kernels' own prange loops (explicit copies, see _copy_rows).
    """
    n = X.shape[0]
    k = Y.shape[1]
    n_params = params.shape[0]
    capacity = batch_size
    in_order = orders.shape[1] == 0
    for epoch in range(lrs.shape[0]):
        for i in range(n_params):
            backup[0, i] = params[i]
            backup[1, i] = opt_state[0, i]
            backup[2, i] = opt_state[1, i]
        step0 = steps_done[0]
        total = 0.0
        for start in range(0, n, batch_size):
            n_rows = min(batch_size, n - start)
            inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
            if in_order:
                _copy_rows(inputs, X, start)
                batch_targets = Y[start:start + n_rows]
            else:
                gather_rows(inputs, X, orders[epoch], start)
                batch_targets = targets_batch[:n_rows]
                gather_rows(batch_targets, Y, orders[epoch], start)
            if sample_weights is None:
                inv_divisor = params.dtype.type(1.0 / loss_divisor(loss, n_rows, k))
                total += batch_grads(grads, acts, deltas, row_losses, scratch, params, batch_targets, sizes,
                                     param_offsets, unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows,
                                     narrow, wide)
            else:
                if in_order:
                    batch_weights = sample_weights[start:start + n_rows]
                else:
                    batch_weights = weights_batch[:n_rows]
                    for r in range(n_rows):
                        batch_weights[r] = sample_weights[orders[epoch, start + r]]
                inv_divisor = params.dtype.type(weighted_inv_divisor(loss, batch_weights, k))
                total += batch_grads(grads, acts, deltas, row_losses, scratch, params, batch_targets, sizes,
                                     param_offsets, unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows,
                                     narrow, wide, batch_weights)
            steps_done[0] += 1
            optimizer_step(params, opt_state, grads, lrs[epoch], optimizer, hyper, steps_done[0])
        if sample_weights is None:
            epoch_loss = total / loss_divisor(loss, n, k)
        else:
            epoch_loss = total * weighted_inv_divisor(loss, sample_weights, k)
        epoch_losses[epoch] = epoch_loss
        if not np.isfinite(epoch_loss):
            for i in range(n_params):
                params[i] = backup[0, i]
                opt_state[0, i] = backup[1, i]
                opt_state[1, i] = backup[2, i]
            steps_done[0] = step0
            return epoch
        if epoch_loss <= target_loss:
            return epoch + 1
    return lrs.shape[0]


@cpu_jit()
def predict(out, acts, X, params, sizes, param_offsets, unit_offsets, act_codes, loss, capacity):
    """out (n, k) = the network's transformed output for X (n, n_in), computed ``capacity`` rows at a time."""
    n = X.shape[0]
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
        _copy_rows(inputs, X, start)
        logits = forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows)
        output_transform(out[start:start + n_rows], logits, loss)


@cpu_jit()
def dataset_grads(grads, grads_chunk, acts, deltas, row_losses, scratch, X, Y, params, sizes, param_offsets,
                  unit_offsets, act_codes, loss, capacity, divisor, narrow, wide, sample_weights=None):
    """Sum of the row losses of X (n, n_in), Y (n, k) divided by ``divisor``, and its exact gradient into
    grads (P,), overwritten. ``divisor`` is loss_divisor(loss, n, k) for the mean over this set, or the
    global batch's divisor when these rows are one process's share of it.

    Works ``capacity`` rows at a time: each chunk's gradient is already scaled by 1 / divisor, so the
    chunks add up to the whole set's gradient. sample_weights (n,) or None: each row's loss counts w_i times
    (the divisor is then the weighted one: sum of the weights times one row's divisor)."""
    n = X.shape[0]
    inv_divisor = params.dtype.type(1.0 / divisor)
    for i in range(grads.shape[0]):
        grads[i] = 0
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
        _copy_rows(inputs, X, start)
        if sample_weights is None:
            total += batch_grads(grads_chunk, acts, deltas, row_losses, scratch, params, Y[start:start + n_rows],
                                 sizes, param_offsets, unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows,
                                 narrow, wide)
        else:
            total += batch_grads(grads_chunk, acts, deltas, row_losses, scratch, params, Y[start:start + n_rows],
                                 sizes, param_offsets, unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows,
                                 narrow, wide, sample_weights[start:start + n_rows])
        for i in range(grads.shape[0]):
            grads[i] += grads_chunk[i]
    return total / divisor


@cpu_jit()
def dataset_loss(acts, deltas, row_losses, X, Y, params, sizes, param_offsets, unit_offsets, act_codes, loss,
                 capacity, sample_weights=None):
    """Mean loss over all of X (n, n_in), Y (n, k) under the current params, ``capacity`` rows at a time;
    with sample_weights (n,), the weighted mean sum_i w_i l_i / sum_i w_i (l_i: the row's loss)."""
    n = X.shape[0]
    k = Y.shape[1]
    n_layers = sizes.shape[0] - 1
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
        _copy_rows(inputs, X, start)
        logits = forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows)
        dlogits = activation_view(deltas, sizes, unit_offsets, capacity, n_layers, n_rows)
        loss_grad(dlogits, row_losses[:n_rows], logits, Y[start:start + n_rows], loss, params.dtype.type(1.0))
        if sample_weights is None:
            for i in range(n_rows):
                total += row_losses[i]
        else:
            for i in range(n_rows):
                total += np.float64(sample_weights[start + i]) * np.float64(row_losses[i])
    if sample_weights is None:
        return total / loss_divisor(loss, n, k)
    return total * weighted_inv_divisor(loss, sample_weights, k)
