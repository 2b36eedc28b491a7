"""CPU kernels: explicit loops compiled with numba ``@njit``.

Vocabulary shared with ``fastbp.kernels.cuda`` (same names, same signatures, outputs first):
    dense_forward(out, inp, weight, bias, act)
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)
    loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor)
    output_transform(out, logits, loss)
    sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step)
    adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2)
    gather_rows(out, source, order, start)

Every kernel OVERWRITES its outputs (an MLP has no residual fan-in, so nothing accumulates across calls)
and allocates nothing. ``*_naive`` kernels are the serial references the fast ones are tested against.

Above the kernels sit the CPU-only drivers that run a whole step, epoch or many epochs inside one
compiled call (``batch_grads``, ``optimizer_step``, ``train_epochs``, ``predict``, ``dataset_loss``), so
Python is touched once per call rather than once per layer and step.

Parameters live in ONE flat vector (W0, b0, W1, b1, ...; see ``fastbp.layout``): one optimizer update over
it, one buffer to allreduce, few kernel arguments.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from .._jit import cpu_jit, inline
from .pointwise import (
    ADAM,
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    activate,
    activation_grad,
    adam_update_one,
    loss_divisor,
    loss_grad_row,
    output_transform_row,
    sgd_update_one,
)

# Below this many multiply-adds a kernel runs on the calling thread: a prange launch costs microseconds,
# more than small layers take (numba issues #3213, #6568).
PARALLEL_MIN_WORK = 1 << 15
# Rows per parallel task (each task owns whole output rows: no races, no atomics).
ROW_BLOCK = 16


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
    # axpy form: out[i, :] += inp[i, k] * weight[k, :], unit stride over j so LLVM vectorises it.
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    for i in range(row_start, row_stop):
        for j in range(n_out):
            out[i, j] = bias[j]
        for k in range(n_in):
            a = inp[i, k]
            for j in range(n_out):
                out[i, j] += a * weight[k, j]
        for j in range(n_out):
            out[i, j] = activate(out[i, j], act)


@cpu_jit()
def dense_forward(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten. inp (B, n_in), weight (n_in, n_out), bias (n_out,), out (B, n_out)."""
    n_rows = inp.shape[0]
    if n_rows * weight.shape[0] * weight.shape[1] < PARALLEL_MIN_WORK:
        _dense_forward_rows(out, inp, weight, bias, act, 0, n_rows)
        return
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for block in prange(n_blocks):
        start = block * ROW_BLOCK
        _dense_forward_rows(out, inp, weight, bias, act, start, min(start + ROW_BLOCK, n_rows))


@inline
def _dense_backward_weight_rows(dweight, dout, inp, k_start, k_stop):
    # dweight[k, :] = sum_i inp[i, k] * dout[i, :]: each task owns whole rows of dweight (no atomics).
    n_out = dout.shape[1]
    for k in range(k_start, k_stop):
        for j in range(n_out):
            dweight[k, j] = 0
        for i in range(dout.shape[0]):
            a = inp[i, k]
            for j in range(n_out):
                dweight[k, j] += a * dout[i, j]


@cpu_jit()
def dense_backward_params(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten. dout (B, n_out), inp (B, n_in),
    dweight (n_in, n_out), dbias (n_out,). Reductions run in a fixed order: results do not depend on threads."""
    n_in = dweight.shape[0]
    if dout.shape[0] * n_in * dout.shape[1] < PARALLEL_MIN_WORK:
        _dense_backward_weight_rows(dweight, dout, inp, 0, n_in)
    else:
        n_blocks = (n_in + ROW_BLOCK - 1) // ROW_BLOCK
        for block in prange(n_blocks):
            start = block * ROW_BLOCK
            _dense_backward_weight_rows(dweight, dout, inp, start, min(start + ROW_BLOCK, n_in))
    for j in range(dbias.shape[0]):
        dbias[j] = 0
    for i in range(dout.shape[0]):
        for j in range(dbias.shape[0]):
            dbias[j] += dout[i, j]


@inline
def _dense_backward_input_rows(dinp, dout, weight, inp, inp_act, row_start, row_stop):
    # dinp[i, k] = dot(dout[i, :], weight[k, :]) * act'(inp[i, k]): two unit-stride rows per dot product.
    zero = dinp.dtype.type(0.0)
    for i in range(row_start, row_stop):
        for k in range(weight.shape[0]):
            acc = zero
            for j in range(weight.shape[1]):
                acc += dout[i, j] * weight[k, j]
            dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)


@cpu_jit()
def dense_backward_input(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: gradient w.r.t. the previous layer's
    pre-activation. dout (B, n_out), weight (n_in, n_out), inp (B, n_in) = previous layer's output."""
    n_rows = dout.shape[0]
    if n_rows * weight.shape[0] * weight.shape[1] < PARALLEL_MIN_WORK:
        _dense_backward_input_rows(dinp, dout, weight, inp, inp_act, 0, n_rows)
        return
    n_blocks = (n_rows + ROW_BLOCK - 1) // ROW_BLOCK
    for block in prange(n_blocks):
        start = block * ROW_BLOCK
        _dense_backward_input_rows(dinp, dout, weight, inp, inp_act, start, min(start + ROW_BLOCK, n_rows))


@cpu_jit()
def dense_backward(dinp, dweight, dbias, dout, inp, weight, inp_act):
    """Both halves of a dense layer's backward pass (see dense_backward_params, dense_backward_input)."""
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)


@cpu_jit()
def loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor):
    """Fused loss and gradient, overwritten: dlogits (B, k) = d mean-loss / d logits, row_losses (B,) each
    row's summed loss. logits, targets (B, k); inv_divisor = 1 / loss_divisor(loss, n, k)."""
    for i in range(logits.shape[0]):
        row_losses[i] = loss_grad_row(dlogits[i], logits[i], targets[i], loss, inv_divisor)


@cpu_jit()
def output_transform(out, logits, loss):
    """out (B, k) = the loss's output transform of logits (B, k): identity, sigmoid or softmax."""
    for i in range(logits.shape[0]):
        output_transform_row(out[i], logits[i], loss)


@cpu_jit()
def sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD step over flat vectors (P,), in place. Scalars in the parameters' dtype."""
    for i in range(params.shape[0]):
        sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov, first_step)


@cpu_jit()
def adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2):
    """torch.optim.Adam step over flat vectors (P,), in place. Scalars in the parameters' dtype."""
    for i in range(params.shape[0]):
        adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                        step_size, sqrt_bias_correction2)


@cpu_jit()
def gather_rows(out, source, order, start):
    """out[r] = source[order[start + r]] for r < out.shape[0], overwritten: one mini-batch, contiguous."""
    for r in range(out.shape[0]):
        src = order[start + r]
        for j in range(source.shape[1]):
            out[r, j] = source[src, j]


# --- views into flat buffers ---------------------------------------------------------------------------------
@inline
def weight_view(params, sizes, param_offsets, layer):
    start = param_offsets[layer]
    return params[start:start + sizes[layer] * sizes[layer + 1]].reshape((sizes[layer], sizes[layer + 1]))


@inline
def bias_view(params, sizes, param_offsets, layer):
    start = param_offsets[layer] + sizes[layer] * sizes[layer + 1]
    return params[start:start + sizes[layer + 1]]


@inline
def activation_view(buffer, sizes, unit_offsets, capacity, layer, n_rows):
    """Layer ``layer``'s (n_rows, sizes[layer]) slot of a workspace buffer of ``capacity`` rows."""
    start = capacity * unit_offsets[layer]
    return buffer[start:start + n_rows * sizes[layer]].reshape((n_rows, sizes[layer]))


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


@cpu_jit()
def batch_grads(grads, acts, deltas, row_losses, params, targets, sizes, param_offsets, unit_offsets, capacity,
                act_codes, loss, inv_divisor, n_rows):
    """One forward and backward pass on the n_rows input rows in acts' layer-0 slot; grads (P,) overwritten
    with d(sum of row losses * inv_divisor)/d params. Returns the float64 sum of the row losses."""
    n_layers = sizes.shape[0] - 1
    logits = forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows)
    dlogits = activation_view(deltas, sizes, unit_offsets, capacity, n_layers, n_rows)
    loss_grad(dlogits, row_losses[:n_rows], logits, targets, loss, inv_divisor)
    total = 0.0
    for i in range(n_rows):
        total += row_losses[i]
    for layer in range(n_layers - 1, -1, -1):
        dout = activation_view(deltas, sizes, unit_offsets, capacity, layer + 1, n_rows)
        inp = activation_view(acts, sizes, unit_offsets, capacity, layer, n_rows)
        dense_backward_params(weight_view(grads, sizes, param_offsets, layer),
                              bias_view(grads, sizes, param_offsets, layer), dout, inp)
        if layer > 0:  # the input layer's gradient is never needed
            dinp = activation_view(deltas, sizes, unit_offsets, capacity, layer, n_rows)
            dense_backward_input(dinp, dout, weight_view(params, sizes, param_offsets, layer), inp,
                                 act_codes[layer - 1])
    return total


@cpu_jit()
def optimizer_step(params, opt_state, grads, lr, optimizer, hyper, step):
    """One optimizer update of the flat params (P,) in place; ``step`` counts from 1 (torch's state['step']).

    opt_state (2, P): SGD's momentum buffer in row 0; Adam's exp_avg and exp_avg_sq in rows 0 and 1.
    hyper: float64 vector indexed by pointwise.H_*; bias corrections are formed in float64, then cast.
    """
    dtype = params.dtype.type
    weight_decay = dtype(hyper[H_WEIGHT_DECAY])
    if optimizer == ADAM:
        beta1 = hyper[H_BETA1]
        beta2 = hyper[H_BETA2]
        step_size = lr / (1.0 - beta1 ** step)
        sqrt_bc2 = np.sqrt(1.0 - beta2 ** step)
        adam_update(params, opt_state[0], opt_state[1], grads, dtype(lr), dtype(beta1), dtype(beta2),
                    dtype(hyper[H_EPS]), weight_decay, dtype(step_size), dtype(sqrt_bc2))
    else:
        sgd_update(params, opt_state[0], grads, dtype(lr), dtype(hyper[H_MOMENTUM]), dtype(hyper[H_DAMPENING]),
                   weight_decay, hyper[H_NESTEROV] != 0.0, step == 1)


@cpu_jit()
def train_epochs(params, opt_state, steps_done, grads, acts, deltas, targets_batch, row_losses, backup,
                 X, Y, orders, lrs, epoch_losses,
                 sizes, param_offsets, unit_offsets, act_codes, loss, optimizer, hyper, batch_size, target_loss):
    """Train ``len(lrs)`` epochs in one call; returns how many completed.

    params (P,), opt_state (2, P), steps_done (1,) int64: updated in place. X (n, n_in), Y (n, k).
    orders (E, n) int64: each epoch's sample order; an (E, 0) array means "in order, no copy" (full batch).
    lrs (E,) float64: each epoch's learning rate. epoch_losses (E,) float64: written, each epoch's mean loss
    over its samples (each sample's loss under the weights at the time its batch was processed).
    Workspace: grads (P,), acts and deltas (batch_size * sum(sizes),), targets_batch (batch_size, k),
    row_losses (batch_size,), backup (3, P). Stops early after an epoch whose loss is not finite (params and
    opt_state are then restored to that epoch's start, and the returned count excludes it) or whose loss
    is <= target_loss.
    """
    n = X.shape[0]
    k = Y.shape[1]
    capacity = batch_size
    in_order = orders.shape[1] == 0
    for epoch in range(lrs.shape[0]):
        backup[0, :] = params
        backup[1:, :] = opt_state
        step0 = steps_done[0]
        total = 0.0
        for start in range(0, n, batch_size):
            n_rows = min(batch_size, n - start)
            inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
            if in_order:
                inputs[:, :] = X[start:start + n_rows]
                batch_targets = Y[start:start + n_rows]
            else:
                gather_rows(inputs, X, orders[epoch], start)
                batch_targets = targets_batch[:n_rows]
                gather_rows(batch_targets, Y, orders[epoch], start)
            inv_divisor = params.dtype.type(1.0 / loss_divisor(loss, n_rows, k))
            total += batch_grads(grads, acts, deltas, row_losses, params, batch_targets, sizes, param_offsets,
                                 unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows)
            steps_done[0] += 1
            optimizer_step(params, opt_state, grads, lrs[epoch], optimizer, hyper, steps_done[0])
        epoch_loss = total / loss_divisor(loss, n, k)
        epoch_losses[epoch] = epoch_loss
        if not np.isfinite(epoch_loss):
            params[:] = backup[0]
            opt_state[:, :] = backup[1:]
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
        inputs[:, :] = X[start:start + n_rows]
        logits = forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows)
        output_transform(out[start:start + n_rows], logits, loss)


@cpu_jit()
def dataset_grads(grads, grads_chunk, acts, deltas, row_losses, X, Y, params, sizes, param_offsets, unit_offsets,
                  act_codes, loss, capacity, divisor):
    """Sum of the row losses of X (n, n_in), Y (n, k) divided by ``divisor``, and its exact gradient into
    grads (P,), overwritten. ``divisor`` is loss_divisor(loss, n, k) for the mean over this set, or the
    global batch's divisor when these rows are one process's share of it.

    Works ``capacity`` rows at a time: each chunk's gradient is already scaled by 1 / divisor, so the
    chunks add up to the whole set's gradient."""
    n = X.shape[0]
    inv_divisor = params.dtype.type(1.0 / divisor)
    grads[:] = 0
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
        inputs[:, :] = X[start:start + n_rows]
        total += batch_grads(grads_chunk, acts, deltas, row_losses, params, Y[start:start + n_rows], sizes,
                             param_offsets, unit_offsets, capacity, act_codes, loss, inv_divisor, n_rows)
        for i in range(grads.shape[0]):
            grads[i] += grads_chunk[i]
    return total / divisor


@cpu_jit()
def dataset_loss(acts, deltas, row_losses, X, Y, params, sizes, param_offsets, unit_offsets, act_codes, loss,
                 capacity):
    """Mean loss over all of X (n, n_in), Y (n, k) under the current params, ``capacity`` rows at a time."""
    n = X.shape[0]
    k = Y.shape[1]
    n_layers = sizes.shape[0] - 1
    total = 0.0
    for start in range(0, n, capacity):
        n_rows = min(capacity, n - start)
        inputs = activation_view(acts, sizes, unit_offsets, capacity, 0, n_rows)
        inputs[:, :] = X[start:start + n_rows]
        logits = forward_logits(acts, sizes, param_offsets, unit_offsets, capacity, act_codes, params, n_rows)
        dlogits = activation_view(deltas, sizes, unit_offsets, capacity, n_layers, n_rows)
        loss_grad(dlogits, row_losses[:n_rows], logits, Y[start:start + n_rows], loss, params.dtype.type(1.0))
        for i in range(n_rows):
            total += row_losses[i]
    return total / loss_divisor(loss, n, k)
