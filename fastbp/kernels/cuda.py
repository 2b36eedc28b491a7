"""CUDA kernels: explicit loops compiled with numba-cuda ``@cuda.jit``.

Vocabulary shared with ``fastbp.kernels.cpu`` (same names, same signatures, outputs first); here each
name is a host-side launcher that sizes the grid and launches its ``_..._kernel``:
    dense_forward(out, inp, weight, bias, act)
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)
    loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor)
    output_transform(out, logits, loss)
    sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step)
    adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2)
    gather_rows(out, source, order, start)
plus what the CPU does inline but the GPU needs as launches: ``sum_into`` (a deterministic one-block
reduction: the epoch's loss is summed ON the device) and ``add_into`` (chunked gradients).

Every kernel OVERWRITES its outputs (except ``add_into``, which exists to accumulate) and allocates
nothing. ``*_naive`` kernels (one thread per output element, serial dot product) are the references the
tiled shared-memory kernels are tested against. Each thread owns its output elements: no atomics, and
each sum runs in a fixed order (plain k order; the CPU's vectorised products use partial sums), so runs
are deterministic and the two targets agree to rounding.

This is the ONE module that imports the CUDA binding (``numba.cuda``): switching to another binding is a
change to this file. Decorators are lazy (no signatures): importing works without a GPU, and
``kernel_signatures`` lists the signatures the trainer uses for the PTX check (``tests/cuda/test_ptx.py``)
and the resource report (``python -m fastbp.kernels.cuda_report``).

Launch settings are module-level so tests can shrink them (inputs then span several blocks, with a
partial one). ``TILE`` and ``REDUCE_THREADS`` size shared arrays, so they are compile-time constants on
a GPU: change them only before the first launch in a process.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np

# numba-cuda (the NVIDIA-maintained CUDA target that ``numba.cuda`` redirects to) must be installed: without
# it numba's deprecated built-in target would answer instead. The error names the missing extra.
try:
    import numba_cuda  # noqa: F401
except ModuleNotFoundError as error:
    raise ModuleNotFoundError("numba-cuda is not installed", name="numba_cuda") from error
from numba import config, cuda
from numba import types as nbtypes
from numba.core.errors import NumbaPerformanceWarning

from . import pointwise

# --- launch settings (patchable by tests; see the module docstring) ----------------------------------------
TILE = 16  # tiled dense kernels: (TILE, TILE) threads per block, two (TILE, TILE) shared tiles
BLOCK_2D = (16, 16)  # naive dense kernels and gather_rows: (columns, rows) threads per block
BLOCK_1D = 256  # per-row and per-element kernels
REDUCE_THREADS = 256  # sum_into: one block of this many threads (a power of two)
# fastmath: fused multiply-add, approximate division / sqrt / exp / log, flushed denormals. Parity tests
# allow for it on hardware (the simulator ignores it). FASTBP_CUDA_FASTMATH=0 turns it off.
FASTMATH = os.environ.get("FASTBP_CUDA_FASTMATH", "1").lower() not in ("0", "false", "no", "off")

SIMULATOR = bool(config.ENABLE_CUDASIM)  # numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) is active

kernel = cuda.jit(fastmath=FASTMATH)


def _make_simulator_shared_arrays_thread_safe() -> None:
    """Under the simulator, give each block ONE array per ``cuda.shared.array`` call site, whatever the timing.

    numba-cuda 0.30's simulator runs a block's threads as Python threads and creates a shared array on the
    first call from a source line without a lock: two threads that both find no array yet each create
    one, and then write tiles the other never sees (garbage reads, rare and timing-dependent: seen as a
    NaN loss on a loaded machine). Same lookup as the simulator's (by the caller's file and line), under a
    lock. A GPU is unaffected."""
    import sys
    import threading

    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "_fastbp_thread_safe", False):
        return
    original = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: as before
            return original(self, shape, dtype, alignment)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = np.empty(shape, numpy_support.as_dtype(dtype) if isinstance(dtype, nbtypes.Type) else dtype)
                self._allocations[caller] = res
        return res

    shared.array = array
    shared._fastbp_thread_safe = True


if SIMULATOR:
    _make_simulator_shared_arrays_thread_safe()


def _shared_source(func):
    """A pointwise function as the kernels call it: the inline numba function on a GPU (compiled into each
    kernel from the same source the CPU kernels inline); its plain Python source under the simulator,
    whose in-kernel array wrappers a compiled CPU function cannot take as arguments."""
    return func.py_func if SIMULATOR else func


activate = _shared_source(pointwise.activate)
activation_grad = _shared_source(pointwise.activation_grad)
loss_grad_row = _shared_source(pointwise.loss_grad_row)
output_transform_row = _shared_source(pointwise.output_transform_row)
sgd_update_one = _shared_source(pointwise.sgd_update_one)
adam_update_one = _shared_source(pointwise.adam_update_one)


def _blocks(n: int, per_block: int) -> int:
    return max(1, (n + per_block - 1) // per_block)


# --- device handling (every use of the binding outside kernels goes through here) ------------------------
def unavailable_reason() -> str | None:
    """None when CUDA kernels can run here (a GPU, or the simulator), otherwise why not and how to fix it."""
    if getattr(cuda, "implementation", None) != "NVIDIA":
        return ("numba's built-in, deprecated CUDA target is active instead of numba-cuda; install it with: "
                "pip install 'fastbp[cuda]'")
    try:
        if cuda.is_available():
            return None
    except Exception as error:  # a broken driver install raises rather than answering False
        return f"the CUDA driver could not be initialised ({error})"
    return ("no usable NVIDIA GPU was found (numba.cuda.is_available() is False: no GPU, no driver, or "
            "CUDA_VISIBLE_DEVICES hides it); run on a machine with an NVIDIA GPU and driver, or set "
            "NUMBA_ENABLE_CUDASIM=1 to run the CUDA path in numba's (slow) simulator")


def is_device_array(x) -> bool:
    """True for numba device arrays (and the simulator's) and any object exposing
    ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors)."""
    if isinstance(x, np.ndarray):
        return False
    return bool(getattr(x, "__cuda_ndarray__", False)) or hasattr(x, "__cuda_array_interface__")


def as_device_array(x):
    """A numba device array viewing the same GPU memory as ``x``, without a copy."""
    return x if getattr(x, "__cuda_ndarray__", False) else cuda.as_cuda_array(x)


def to_device(x):
    return cuda.to_device(x)


def device_empty(shape, dtype):
    return cuda.device_array(shape, dtype=dtype)


def device_zeros(shape, dtype):
    return cuda.to_device(np.zeros(shape, dtype=dtype))


def synchronize() -> None:
    cuda.synchronize()


def quiet_launches():
    """A context in which numba's low-occupancy warning is silenced: small batches launch small grids on
    purpose (a training step is a chain of small launches), and one warning per launch helps no one."""
    context = warnings.catch_warnings()

    class _Quiet:
        def __enter__(self):
            context.__enter__()
            warnings.simplefilter("ignore", NumbaPerformanceWarning)

        def __exit__(self, *exc):
            return context.__exit__(*exc)

    return _Quiet()


# --- reference kernels (one thread per output element, serial dot product) -------------------------------
@kernel
def _dense_forward_naive_kernel(out, inp, weight, bias, act):
    # out (B, n_out) = act(inp (B, n_in) @ weight (n_in, n_out) + bias (n_out,)); thread (j, i) owns out[i, j].
    j, i = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        acc = bias[j]
        for k in range(weight.shape[0]):
            acc += inp[i, k] * weight[k, j]
        out[i, j] = activate(acc, act)


@kernel
def _dense_backward_params_naive_kernel(dweight, dbias, dout, inp):
    # dweight (n_in, n_out) = inp.T @ dout, dbias (n_out,) = dout.sum(0); dout (B, n_out), inp (B, n_in).
    # Thread (j, k) owns dweight[k, j]; the extra row k == n_in computes dbias (inp taken as 1).
    j, k = cuda.grid(2)
    n_in = dweight.shape[0]
    if j < dweight.shape[1] and k <= n_in:
        acc = dweight.dtype.type(0.0)
        if k < n_in:
            for i in range(dout.shape[0]):
                acc += inp[i, k] * dout[i, j]
            dweight[k, j] = acc
        else:
            for i in range(dout.shape[0]):
                acc += dout[i, j]
            dbias[j] = acc


@kernel
def _dense_backward_input_naive_kernel(dinp, dout, weight, inp, inp_act):
    # dinp (B, n_in) = (dout (B, n_out) @ weight.T) * act'(inp): thread (k, i) owns dinp[i, k].
    k, i = cuda.grid(2)
    if i < dinp.shape[0] and k < dinp.shape[1]:
        acc = dinp.dtype.type(0.0)
        for j in range(weight.shape[1]):
            acc += dout[i, j] * weight[k, j]
        dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)


# --- tiled kernels: (TILE, TILE) blocks stage both operands in shared memory -------------------------------
@kernel
def _dense_forward_kernel(out, inp, weight, bias, act):
    # out (B, n_out) = act(inp (B, n_in) @ weight (n_in, n_out) + bias). Block (bx, by) owns a TILE x TILE
    # tile of out; each step stages inp[rows, k0:k0+TILE] and weight[k0:k0+TILE, cols] in shared memory
    # (coalesced loads: threadIdx.x runs along each row). The sum runs over k in order (the CPU's vectorised
    # products keep partial sums instead: the targets agree to rounding, not bit for bit).
    inp_tile = cuda.shared.array((TILE, TILE), dtype=inp.dtype)  # inp_tile[r, t] = inp[i0 + r, k0 + t]
    weight_tile = cuda.shared.array((TILE, TILE), dtype=inp.dtype)  # weight_tile[t, c] = weight[k0 + t, j0 + c]
    zero = out.dtype.type(0.0)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.y * TILE + ty
    j = cuda.blockIdx.x * TILE + tx
    n_rows = out.shape[0]
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    acc = bias[j] if j < n_out else zero
    for k0 in range(0, n_in, TILE):
        inp_tile[ty, tx] = inp[i, k0 + tx] if i < n_rows and k0 + tx < n_in else zero
        weight_tile[ty, tx] = weight[k0 + ty, j] if k0 + ty < n_in and j < n_out else zero
        cuda.syncthreads()
        for t in range(min(TILE, n_in - k0)):
            acc += inp_tile[ty, t] * weight_tile[t, tx]
        cuda.syncthreads()
    if i < n_rows and j < n_out:
        out[i, j] = activate(acc, act)


@kernel
def _dense_backward_params_kernel(dweight, dbias, dout, inp):
    # dweight (n_in, n_out) = inp.T @ dout, dbias = dout.sum(0): the reduction runs over the batch rows.
    # The grid covers n_in + 1 rows: row n_in is dbias (its "input" is 1). Each step stages
    # inp[i0:i0+TILE, k-tile] (transposed) and dout[i0:i0+TILE, j-tile]; the sum runs over i in order.
    inp_tile = cuda.shared.array((TILE, TILE), dtype=inp.dtype)  # inp_tile[r, t] = inp[i0 + t, k0 + r]
    dout_tile = cuda.shared.array((TILE, TILE), dtype=inp.dtype)  # dout_tile[t, c] = dout[i0 + t, j0 + c]
    zero = dweight.dtype.type(0.0)
    one = dweight.dtype.type(1.0)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    k0 = cuda.blockIdx.y * TILE
    j = cuda.blockIdx.x * TILE + tx
    k = k0 + ty
    n_rows = dout.shape[0]
    n_in = dweight.shape[0]
    n_out = dweight.shape[1]
    acc = zero
    for i0 in range(0, n_rows, TILE):
        i = i0 + ty  # this thread loads row i of the batch, column k0 + tx of inp
        kk = k0 + tx
        if i < n_rows and kk < n_in:
            inp_tile[tx, ty] = inp[i, kk]
        elif i < n_rows and kk == n_in:
            inp_tile[tx, ty] = one
        else:
            inp_tile[tx, ty] = zero
        dout_tile[ty, tx] = dout[i, j] if i < n_rows and j < n_out else zero
        cuda.syncthreads()
        for t in range(min(TILE, n_rows - i0)):
            acc += inp_tile[ty, t] * dout_tile[t, tx]
        cuda.syncthreads()
    if j < n_out:
        if k < n_in:
            dweight[k, j] = acc
        elif k == n_in:
            dbias[j] = acc


@kernel
def _dense_backward_input_kernel(dinp, dout, weight, inp, inp_act):
    # dinp (B, n_in) = (dout (B, n_out) @ weight (n_in, n_out).T) * act'(inp): the reduction runs over the
    # layer's outputs j. Each step stages dout[rows, j0:j0+TILE] and weight[k-tile, j0:j0+TILE] (transposed).
    dout_tile = cuda.shared.array((TILE, TILE), dtype=dout.dtype)  # dout_tile[r, t] = dout[i0 + r, j0 + t]
    weight_tile = cuda.shared.array((TILE, TILE), dtype=dout.dtype)  # weight_tile[t, c] = weight[k0 + c, j0 + t]
    zero = dinp.dtype.type(0.0)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.y * TILE + ty
    k0 = cuda.blockIdx.x * TILE
    k = k0 + tx
    n_rows = dinp.shape[0]
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    acc = zero
    for j0 in range(0, n_out, TILE):
        dout_tile[ty, tx] = dout[i, j0 + tx] if i < n_rows and j0 + tx < n_out else zero
        weight_tile[tx, ty] = weight[k0 + ty, j0 + tx] if k0 + ty < n_in and j0 + tx < n_out else zero
        cuda.syncthreads()
        for t in range(min(TILE, n_out - j0)):
            acc += dout_tile[ty, t] * weight_tile[t, tx]
        cuda.syncthreads()
    if i < n_rows and k < n_in:
        dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)


# --- per-row and per-element kernels -----------------------------------------------------------------------
@kernel
def _loss_grad_kernel(dlogits, row_losses, logits, targets, loss, inv_divisor):
    # dlogits (B, k), row_losses (B,), logits, targets (B, k): thread i owns row i (pointwise.loss_grad_row,
    # the same source the CPU kernel inlines).
    i = cuda.grid(1)
    if i < logits.shape[0]:
        row_losses[i] = loss_grad_row(dlogits[i], logits[i], targets[i], loss, inv_divisor)


@kernel
def _output_transform_kernel(out, logits, loss):
    # out, logits (B, k): thread i owns row i.
    i = cuda.grid(1)
    if i < logits.shape[0]:
        output_transform_row(out[i], logits[i], loss)


@kernel
def _sgd_update_kernel(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    # params, velocity, grads (P,): thread i owns element i.
    i = cuda.grid(1)
    if i < params.shape[0]:
        sgd_update_one(params, velocity, grads, i, lr, momentum, dampening, weight_decay, nesterov, first_step)


@kernel
def _adam_update_kernel(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                        sqrt_bias_correction2):
    # params, exp_avg, exp_avg_sq, grads (P,): thread i owns element i.
    i = cuda.grid(1)
    if i < params.shape[0]:
        adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                        step_size, sqrt_bias_correction2)


@kernel
def _gather_rows_kernel(out, source, order, start):
    # out (R, m) = source[order[start:start + R]]; source (n, m), order (n,) int64: thread (j, r) owns out[r, j].
    j, r = cuda.grid(2)
    if r < out.shape[0] and j < out.shape[1]:
        out[r, j] = source[order[start + r], j]


@kernel
def _sum_into_kernel(totals, index, values):
    # totals[index] = values.sum(); values (n,). ONE block of REDUCE_THREADS threads: each sums a strided
    # share in order, then a tree in shared memory. Deterministic (no atomics), whatever the launch.
    partial = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    t = cuda.threadIdx.x
    acc = values.dtype.type(0.0)
    for r in range(t, values.shape[0], REDUCE_THREADS):
        acc += values[r]
    partial[t] = acc
    cuda.syncthreads()
    stride = REDUCE_THREADS // 2
    while stride > 0:
        if t < stride:
            partial[t] += partial[t + stride]
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        totals[index] = partial[0]


@kernel
def _add_into_kernel(out, x):
    # out (P,) += x (P,): the one accumulating kernel (gradients of a data set taken in chunks).
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] += x[i]


@cuda.jit(fastmath=False)  # fastmath would let the compiler assume no NaN or inf: the very thing checked
def _array_stats_kernel(stats, values):
    # stats (3,) = [number of non-finite values, min, max] of values (n,) (finite ones); ONE block of
    # REDUCE_THREADS threads. Validates data that is already on the GPU without copying it to the host.
    bad = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    low = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    high = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    t = cuda.threadIdx.x
    zero = values.dtype.type(0.0)
    n_bad = zero
    lo = zero
    hi = zero
    seen = False
    for r in range(t, values.shape[0], REDUCE_THREADS):
        v = values[r]
        if math.isnan(v) or math.isinf(v):
            n_bad += values.dtype.type(1.0)
        elif not seen:
            lo = v
            hi = v
            seen = True
        else:
            lo = min(lo, v)
            hi = max(hi, v)
    if not seen:  # neutral elements: every value lies between max and min of the first finite one
        lo = values.dtype.type(np.inf)
        hi = values.dtype.type(-np.inf)
    bad[t] = n_bad
    low[t] = lo
    high[t] = hi
    cuda.syncthreads()
    stride = REDUCE_THREADS // 2
    while stride > 0:
        if t < stride:
            bad[t] += bad[t + stride]
            low[t] = min(low[t], low[t + stride])
            high[t] = max(high[t], high[t + stride])
        cuda.syncthreads()
        stride //= 2
    if t == 0:
        stats[0] = bad[0]
        stats[1] = low[0]
        stats[2] = high[0]


# --- launchers: the CPU module's names and signatures ------------------------------------------------------
def dense_forward_naive(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten.
    inp (B, n_in), weight (n_in, n_out), bias (n_out,), out (B, n_out)."""
    bx, by = BLOCK_2D
    _dense_forward_naive_kernel[(_blocks(out.shape[1], bx), _blocks(out.shape[0], by)), (bx, by)](
        out, inp, weight, bias, act)


def dense_backward_params_naive(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout, dbias = dout.sum(0), overwritten. dout (B, n_out) is d loss / d pre-activation."""
    bx, by = BLOCK_2D
    _dense_backward_params_naive_kernel[(_blocks(dweight.shape[1], bx), _blocks(dweight.shape[0] + 1, by)),
                                        (bx, by)](dweight, dbias, dout, inp)


def dense_backward_input_naive(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten (the previous layer's activation derivative fused)."""
    bx, by = BLOCK_2D
    _dense_backward_input_naive_kernel[(_blocks(dinp.shape[1], bx), _blocks(dinp.shape[0], by)), (bx, by)](
        dinp, dout, weight, inp, inp_act)


def dense_forward(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten.
    inp (B, n_in), weight (n_in, n_out), bias (n_out,), out (B, n_out)."""
    _dense_forward_kernel[(_blocks(out.shape[1], TILE), _blocks(out.shape[0], TILE)), (TILE, TILE)](
        out, inp, weight, bias, act)


def dense_backward_params(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten. dout (B, n_out), inp (B, n_in),
    dweight (n_in, n_out), dbias (n_out,). Each thread owns one output: no atomics, fixed order."""
    _dense_backward_params_kernel[(_blocks(dweight.shape[1], TILE), _blocks(dweight.shape[0] + 1, TILE)),
                                  (TILE, TILE)](dweight, dbias, dout, inp)


def dense_backward_input(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: gradient w.r.t. the previous layer's
    pre-activation. dout (B, n_out), weight (n_in, n_out), inp (B, n_in) = previous layer's output."""
    _dense_backward_input_kernel[(_blocks(dinp.shape[1], TILE), _blocks(dinp.shape[0], TILE)), (TILE, TILE)](
        dinp, dout, weight, inp, inp_act)


def dense_backward(dinp, dweight, dbias, dout, inp, weight, inp_act):
    """Both halves of a dense layer's backward pass (see dense_backward_params, dense_backward_input)."""
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)


def loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor):
    """Fused loss and gradient, overwritten: dlogits (B, k) = d mean-loss / d logits, row_losses (B,) each
    row's summed loss. logits, targets (B, k); inv_divisor = 1 / loss_divisor(loss, n, k)."""
    _loss_grad_kernel[_blocks(logits.shape[0], BLOCK_1D), BLOCK_1D](
        dlogits, row_losses, logits, targets, loss, dlogits.dtype.type(inv_divisor))


def output_transform(out, logits, loss):
    """out (B, k) = the loss's output transform of logits (B, k): identity, sigmoid or softmax."""
    _output_transform_kernel[_blocks(logits.shape[0], BLOCK_1D), BLOCK_1D](out, logits, loss)


def sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD step over flat vectors (P,), in place. Scalars are cast to the parameters' dtype."""
    t = params.dtype.type
    _sgd_update_kernel[_blocks(params.shape[0], BLOCK_1D), BLOCK_1D](
        params, velocity, grads, t(lr), t(momentum), t(dampening), t(weight_decay), bool(nesterov),
        bool(first_step))


def adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2):
    """torch.optim.Adam step over flat vectors (P,), in place. Scalars are cast to the parameters' dtype."""
    t = params.dtype.type
    _adam_update_kernel[_blocks(params.shape[0], BLOCK_1D), BLOCK_1D](
        params, exp_avg, exp_avg_sq, grads, t(lr), t(beta1), t(beta2), t(eps), t(weight_decay), t(step_size),
        t(sqrt_bias_correction2))


def gather_rows(out, source, order, start):
    """out[r] = source[order[start + r]] for r < out.shape[0], overwritten: one mini-batch, contiguous."""
    bx, by = BLOCK_2D
    _gather_rows_kernel[(_blocks(out.shape[1], bx), _blocks(out.shape[0], by)), (bx, by)](
        out, source, order, start)


def sum_into(totals, index, values):
    """totals[index] = values.sum() (values (n,)), computed on the device in a fixed order."""
    _sum_into_kernel[1, REDUCE_THREADS](totals, index, values)


def add_into(out, x):
    """out += x over flat vectors (P,)."""
    _add_into_kernel[_blocks(out.shape[0], BLOCK_1D), BLOCK_1D](out, x)


def array_stats(stats, values):
    """stats (3,) = [count of non-finite values, min, max of the finite ones] of the flat values (n,)."""
    _array_stats_kernel[1, REDUCE_THREADS](stats, values)


# --- what the trainer launches, with its argument types (PTX check and resource report) --------------------
def kernel_signatures(dtype):
    """{kernel name: (kernel, argument types)} for every kernel above, as the trainer launches them with
    float ``dtype`` (np.float32 or np.float64): C-contiguous arrays, int64 codes and indices, scalars in
    ``dtype``, bool flags."""
    f = nbtypes.float32 if np.dtype(dtype) == np.float32 else nbtypes.float64
    m = f[:, ::1]
    v = f[::1]
    i64 = nbtypes.int64
    b = nbtypes.boolean
    return {
        "dense_forward_naive": (_dense_forward_naive_kernel, (m, m, m, v, i64)),
        "dense_backward_params_naive": (_dense_backward_params_naive_kernel, (m, v, m, m)),
        "dense_backward_input_naive": (_dense_backward_input_naive_kernel, (m, m, m, m, i64)),
        "dense_forward": (_dense_forward_kernel, (m, m, m, v, i64)),
        "dense_backward_params": (_dense_backward_params_kernel, (m, v, m, m)),
        "dense_backward_input": (_dense_backward_input_kernel, (m, m, m, m, i64)),
        "loss_grad": (_loss_grad_kernel, (m, v, m, m, i64, f)),
        "output_transform": (_output_transform_kernel, (m, m, i64)),
        "sgd_update": (_sgd_update_kernel, (v, v, v, f, f, f, f, b, b)),
        "adam_update": (_adam_update_kernel, (v, v, v, v, f, f, f, f, f, f, f)),
        "gather_rows": (_gather_rows_kernel, (m, m, nbtypes.int64[::1], i64)),
        "sum_into": (_sum_into_kernel, (v, i64, v)),
        "add_into": (_add_into_kernel, (v, v)),
        "array_stats": (_array_stats_kernel, (v, v)),
    }


def compile_ptx(name: str, dtype, cc=(9, 0)) -> str:
    """PTX of kernel ``name`` for ``dtype`` and compute capability ``cc``; needs no GPU (NVRTC and NVVM only)."""
    kern, argtypes = kernel_signatures(dtype)[name]
    fastmath = bool(kern.targetoptions.get("fastmath", False))  # as the kernel's own decorator says
    ptx, _ = cuda.compile_ptx(kern.py_func, argtypes, cc=cc, fastmath=fastmath)
    return ptx
