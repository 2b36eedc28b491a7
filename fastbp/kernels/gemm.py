"""fastbp's CPU product engine: register-blocked dense-layer products on explicit SIMD vectors (see simd.py).

Public kernels (outputs first; every one OVERWRITES its outputs and allocates nothing):
    dense_forward(out, inp, weight, bias, act, panels, order=None, start=0)
    dense_backward_params(dweight, dbias, dout, inp, panels, order=None, start=0)
    dense_backward_params_sgd(weight, bias, velocity_w, velocity_b, dout, inp, panels, lr, momentum, dampening,
                              weight_decay, nesterov, first_step, order=None, start=0)
    dense_backward_input(dinp, dout, weight, inp, inp_act, panels)
each with a serial ``*_naive`` reference beside it, and ``workspace_size(batch, n_in, n_out, dtype)``: the
length of the ``panels`` buffer the caller provides (``forward_workspace``, ``backward_params_workspace`` and
``backward_input_workspace`` give each kernel's own length inside numba code). fastbp.kernels.cpu's vocabulary
kernels of the same names call these on a workspace of their own.

How a product runs
    C = A @ B as a grid of TILE_ROWS x NR tiles of C (NR = TILE_VECTORS vectors), each held in vector
    registers across the WHOLE summed axis: per k, TILE_VECTORS vector loads of B, TILE_ROWS broadcasts of A,
    TILE_ROWS * TILE_VECTORS FMAs (the broadcast/outer-product form), then a fused epilogue (bias and
    activation, activation derivative, or an SGD update) on the tile while it is still in registers.
    AVX2 (16 ymm): 4 x 24 float32 (12 accumulators, 3 loads + 4 broadcasts per 12 FMAs). Measured on a Zen 3
    core with B in L1: 86 GFLOP/s against 77 for the 6 x 16 shape (8 loads per 12 FMAs, the BLIS Haswell
    shape) and 39 for 3 x 32 (17 live registers: spills); an FMA-only loop peaks at 91 there.
    AVX-512 (32 zmm): 6 x 64 float32 (24 accumulators), the shape measured at 113 GFLOP/s on a Zen 4 core.
    128-bit targets use the AVX2 shape on xmm registers.

    B is always read from ``panels``, a copy in panel order (NR columns, all k, contiguous, zero-padded to
    NR) made at the start of each call: the forward packs W, the input gradient W^T, the weight gradient
    dout (and the rows of inp it broadcasts). Reading W as stored (one 4 KiB row stride per k for a
    1024-wide layer: a new page and the same L1 set for every k) ran the 512x1024x1024 product at 0.61x
    OpenBLAS on a Zen 3 core; packed, 1.06x including the copy (0.76 ms of 15.4). Packing costs one read and
    write of the packed operand, 1/M of the product's work. Zero padding means no masked loads in the k loop:
    edge columns are masked only in the epilogue's stores, edge rows compute on a repeated valid row and
    skip the store.

Parallelism: the tile grid is split into numba.get_num_threads() rectangles of whole tiles (rows x panels, the
split that reads the least), one task each: every output belongs to one task and is summed over all of k
in order by the same micro-kernel, so results are bit-identical for any thread count. Below
PARALLEL_MIN_WORK multiply-adds, or on one thread, everything runs on the calling thread.

Vector width: fixed at import by simd.VECTOR_BITS (the target numba compiles for). The disk cache keys on
the CPU name and features, so it separates widths by itself, except under FASTBP_SIMD_BITS: then nothing is
cached (a cached kernel of another width would disagree with workspace_size).
"""
from __future__ import annotations

import math

import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _jit
from .._jit import inline
from . import simd
from .pointwise import IDENTITY, LEAKY_RELU, LEAKY_RELU_SLOPE, RELU, SIGMOID, TANH, activate, activation_grad, sigmoid
from .pointwise import sgd_update_one

# --- the tile shape, from the vector width ---------------------------------------------------------------------
WIDE = simd.VECTOR_BITS >= 512
TILE_ROWS = 6 if WIDE else 4  # MR: rows of C per tile (broadcasts of A per k)
TILE_VECTORS = 4 if WIDE else 3  # vectors of C per tile row (loads of B per k)
# The weight gradient packs inp^T only for batches longer than this (see _weight_grad).
PACK_BROADCAST_MIN_BATCH = 256
NARROW_ROWS = 6  # rows of the narrow kernel (6 x 2 vectors) used for a last panel of <= 2 vectors

# Below this many multiply-adds a product runs on the calling thread (a parallel launch costs microseconds,
# and far more when the second core is busy; see cpu.PARALLEL_MIN_WORK, the same figure).
PARALLEL_MIN_WORK = 1 << 20
# Panels of B swept per pass over a task's row tiles: their depth x NR blocks stay in L2 while every row tile of
# A streams past. A budget, not a count, so that short panels (small depth) sweep in larger groups. Measured on
# a Zen 3 core (512 KiB L2), 512x1024x1024 float32, tiles only, one process, alternating, 11 rounds (a loaded
# machine): groups of 1, 2, 4, 8 and all 43 panels (96 KiB each) at 0.95, 1.01, 0.94, 0.86, 0.82x OpenBLAS.
PANEL_GROUP_BYTES = 192 * 1024

# Epilogue kinds (compile-time constants at every call site, so LLVM keeps one).
_STORE = 0  # C as computed (weight gradient), or an SGD step with gradient C when the hyper-parameters are given
_FORWARD = 1  # act(C + bias)
_INPUT_GRAD = 2  # C * act'(y), y the previous layer's stored output

# The floating-point freedoms of cpu.FAST (reassociation and contraction for the scalar epilogue loops; the
# vector operations of simd carry no flags). Not "nnan"/"ninf": callers test losses with np.isfinite.
FAST = dict(fastmath={"reassoc", "contract", "nsz"}, error_model="numpy")
CACHE = _jit.CACHE_ENABLED and not simd.VECTOR_BITS_FORCED


@intrinsic
def _thread_count(typingctx):
    """numba.get_num_threads() in a form numba can cache: numba's own overload reads a ctypes function pointer,
    a "dynamic global" that makes every function using it uncacheable. This calls the threading layer's
    ``get_num_threads`` symbol, which numba registers when it launches its threads (here, at typing time, and
    when it loads any cached function with a prange). Use it only in functions with a prange."""
    numba.get_num_threads()  # launches numba's threads: registers the symbol with LLVM

    def codegen(context, builder, signature, args):
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(types.intp.bitwidth),
                                                                                  []), "get_num_threads")
        return builder.call(function, [])

    return types.intp(), codegen


def engine_jit(parallel=False):
    """``_jit.cpu_jit`` with this module's fast-math freedoms: ``parallel`` only where there is a prange (two
    serial functions call a parallel one: dense_backward_params[_sgd] -> _weight_grad, which numba >= 0.63
    caches safely, see cpu_jit)."""
    return _jit.cpu_jit(parallel=parallel, cache=CACHE, **FAST)


# --- workspace ---------------------------------------------------------------------------------------------------
def tile_columns(dtype) -> int:
    """NR: columns of C per tile for ``dtype`` (24 float32 / 12 float64 with AVX2, 64 / 32 with AVX-512)."""
    return TILE_VECTORS * simd.lanes_for(dtype)


def _round_up(n, m):
    return (n + m - 1) // m * m


def workspace_size(batch: int, n_in: int, n_out: int, dtype) -> int:
    """Length of the ``panels`` buffer (elements of ``dtype``) that every kernel of this module needs for one
    layer of n_in -> n_out units and ``batch`` rows: the largest of the forward's packed W (n_in x NR-padded
    n_out), the input gradient's packed W^T (n_out x NR-padded n_in) and the weight gradient's packed dout
    and inp (batch x (NR-padded n_out + TILE_ROWS-padded n_in) + NR-padded n_out for the bias sums)."""
    nr = tile_columns(dtype)
    forward = n_in * _round_up(n_out, nr)
    backward_input = n_out * _round_up(n_in, nr)
    backward_params = batch * (_round_up(n_out, nr) + _round_up(n_in, TILE_ROWS)) + _round_up(n_out, nr)
    return int(max(forward, backward_input, backward_params))


@inline
def forward_workspace(n_in, n_out, like):
    """Elements of ``panels`` dense_forward needs for a layer of n_in -> n_out units; ``like`` is any array of
    the operands' dtype (numba code only: the in-kernel form of workspace_size's forward term)."""
    NR = TILE_VECTORS * simd.lanes(like)
    return n_in * ((n_out + NR - 1) // NR * NR)


@inline
def backward_params_workspace(batch, n_in, n_out, like):
    """Elements of ``panels`` dense_backward_params (and _sgd) need: dout's panels, inp^T's panels, the bias sums."""
    NR = TILE_VECTORS * simd.lanes(like)
    padded_out = (n_out + NR - 1) // NR * NR
    return batch * (padded_out + (n_in + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS) + padded_out


@inline
def backward_input_workspace(n_in, n_out, like):
    """Elements of ``panels`` dense_backward_input needs: weight^T in panel order."""
    NR = TILE_VECTORS * simd.lanes(like)
    return n_out * ((n_in + NR - 1) // NR * NR)


@inline
def _leading(a):
    # Elements between a 2-D array's rows (its rows must be contiguous: checked by _check_rows).
    return a.strides[0] // a.itemsize


@inline
def _check_rows(a):
    if a.shape[1] > 1 and a.strides[1] != a.itemsize:
        raise ValueError("fastbp.kernels.gemm: the rows of every 2-D operand must be contiguous")


@inline
def _check_vector(a):
    if a.shape[0] > 1 and a.strides[0] != a.itemsize:
        raise ValueError("fastbp.kernels.gemm: 1-D operands must be contiguous")


# --- micro-kernels ------------------------------------------------------------------------------------------------
# C tile = sum over k of (column k of the A tile) x (row k of a B panel). A's element (t, k) is at
# rows[t] + k * a_step (a_step 1: rows of A as stored; TILE_ROWS: a packed panel); the panel's row k is the
# NR elements from p_off + k * NR. Accumulators start at zero and stay in registers for all k_count terms.
@inline
def _kernel_4x3(A, rows, a_step, P, p_off, k_count):
    L = simd.lanes(P)
    a0, a1, a2, a3 = rows
    c00 = c01 = c02 = c10 = c11 = c12 = c20 = c21 = c22 = c30 = c31 = c32 = simd.zero(P)
    b = p_off
    for _ in range(k_count):
        b0 = simd.load(P, b)
        b1 = simd.load(P, b + L)
        b2 = simd.load(P, b + 2 * L)
        x = simd.broadcast_load(A, a0)
        c00 = simd.fma(x, b0, c00)
        c01 = simd.fma(x, b1, c01)
        c02 = simd.fma(x, b2, c02)
        x = simd.broadcast_load(A, a1)
        c10 = simd.fma(x, b0, c10)
        c11 = simd.fma(x, b1, c11)
        c12 = simd.fma(x, b2, c12)
        x = simd.broadcast_load(A, a2)
        c20 = simd.fma(x, b0, c20)
        c21 = simd.fma(x, b1, c21)
        c22 = simd.fma(x, b2, c22)
        x = simd.broadcast_load(A, a3)
        c30 = simd.fma(x, b0, c30)
        c31 = simd.fma(x, b1, c31)
        c32 = simd.fma(x, b2, c32)
        a0 += a_step
        a1 += a_step
        a2 += a_step
        a3 += a_step
        b += 3 * L
    return ((c00, c01, c02), (c10, c11, c12), (c20, c21, c22), (c30, c31, c32))


@inline
def _kernel_6x4(A, rows, a_step, P, p_off, k_count):
    L = simd.lanes(P)
    a0, a1, a2, a3, a4, a5 = rows
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = c20 = c21 = c22 = c23 = simd.zero(P)
    c30 = c31 = c32 = c33 = c40 = c41 = c42 = c43 = c50 = c51 = c52 = c53 = simd.zero(P)
    b = p_off
    for _ in range(k_count):
        b0 = simd.load(P, b)
        b1 = simd.load(P, b + L)
        b2 = simd.load(P, b + 2 * L)
        b3 = simd.load(P, b + 3 * L)
        x = simd.broadcast_load(A, a0)
        c00 = simd.fma(x, b0, c00)
        c01 = simd.fma(x, b1, c01)
        c02 = simd.fma(x, b2, c02)
        c03 = simd.fma(x, b3, c03)
        x = simd.broadcast_load(A, a1)
        c10 = simd.fma(x, b0, c10)
        c11 = simd.fma(x, b1, c11)
        c12 = simd.fma(x, b2, c12)
        c13 = simd.fma(x, b3, c13)
        x = simd.broadcast_load(A, a2)
        c20 = simd.fma(x, b0, c20)
        c21 = simd.fma(x, b1, c21)
        c22 = simd.fma(x, b2, c22)
        c23 = simd.fma(x, b3, c23)
        x = simd.broadcast_load(A, a3)
        c30 = simd.fma(x, b0, c30)
        c31 = simd.fma(x, b1, c31)
        c32 = simd.fma(x, b2, c32)
        c33 = simd.fma(x, b3, c33)
        x = simd.broadcast_load(A, a4)
        c40 = simd.fma(x, b0, c40)
        c41 = simd.fma(x, b1, c41)
        c42 = simd.fma(x, b2, c42)
        c43 = simd.fma(x, b3, c43)
        x = simd.broadcast_load(A, a5)
        c50 = simd.fma(x, b0, c50)
        c51 = simd.fma(x, b1, c51)
        c52 = simd.fma(x, b2, c52)
        c53 = simd.fma(x, b3, c53)
        a0 += a_step
        a1 += a_step
        a2 += a_step
        a3 += a_step
        a4 += a_step
        a5 += a_step
        b += 4 * L
    return ((c00, c01, c02, c03), (c10, c11, c12, c13), (c20, c21, c22, c23), (c30, c31, c32, c33),
            (c40, c41, c42, c43), (c50, c51, c52, c53))


@inline
def _kernel_narrow(A, rows, a_step, P, p_off, k_count):
    # NARROW_ROWS x 2 vectors, for a layer's last panel when it has at most 2 vectors of columns (a 10-unit
    # output layer, or 1024 = 42 x 24 + 16): the TILE_VECTORS-wide kernel would compute 24 columns for 10
    # there. 6 x 2 vectors: 12 accumulators, the BLIS Haswell shape. Reads P's rows at the panel stride.
    L = simd.lanes(P)
    NR = TILE_VECTORS * L
    a0, a1, a2, a3, a4, a5 = rows
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = simd.zero(P)
    b = p_off
    for _ in range(k_count):
        b0 = simd.load(P, b)
        b1 = simd.load(P, b + L)
        x = simd.broadcast_load(A, a0)
        c00 = simd.fma(x, b0, c00)
        c01 = simd.fma(x, b1, c01)
        x = simd.broadcast_load(A, a1)
        c10 = simd.fma(x, b0, c10)
        c11 = simd.fma(x, b1, c11)
        x = simd.broadcast_load(A, a2)
        c20 = simd.fma(x, b0, c20)
        c21 = simd.fma(x, b1, c21)
        x = simd.broadcast_load(A, a3)
        c30 = simd.fma(x, b0, c30)
        c31 = simd.fma(x, b1, c31)
        x = simd.broadcast_load(A, a4)
        c40 = simd.fma(x, b0, c40)
        c41 = simd.fma(x, b1, c41)
        x = simd.broadcast_load(A, a5)
        c50 = simd.fma(x, b0, c50)
        c51 = simd.fma(x, b1, c51)
        a0 += a_step
        a1 += a_step
        a2 += a_step
        a3 += a_step
        a4 += a_step
        a5 += a_step
        b += NR
    return ((c00, c01), (c10, c11), (c20, c21), (c30, c31), (c40, c41), (c50, c51))


@inline
def _narrow_last_panel(n_cols, NR, L, panel_hi):
    # Whether the layer's last panel (index panel_hi - 1, if this task has it) has at most 2 vectors of columns.
    n_panels = (n_cols + NR - 1) // NR
    return panel_hi == n_panels and n_cols - (n_panels - 1) * NR <= 2 * L


@inline
def _rows_4(first, n_rows, ld, order, start):
    # Offsets of the 4 tile rows of A from row ``first`` (rows past n_rows repeat the last one; their results
    # are never stored). With ``order``, tile row r is row order[start + r] of A (a shuffled mini-batch).
    last = n_rows - 1
    r0 = min(first, last)
    r1 = min(first + 1, last)
    r2 = min(first + 2, last)
    r3 = min(first + 3, last)
    if order is None:
        return (r0 * ld, r1 * ld, r2 * ld, r3 * ld)
    return (order[start + r0] * ld, order[start + r1] * ld, order[start + r2] * ld, order[start + r3] * ld)


@inline
def _rows_6(first, n_rows, ld, order, start):
    last = n_rows - 1
    r0 = min(first, last)
    r1 = min(first + 1, last)
    r2 = min(first + 2, last)
    r3 = min(first + 3, last)
    r4 = min(first + 4, last)
    r5 = min(first + 5, last)
    if order is None:
        return (r0 * ld, r1 * ld, r2 * ld, r3 * ld, r4 * ld, r5 * ld)
    return (order[start + r0] * ld, order[start + r1] * ld, order[start + r2] * ld, order[start + r3] * ld,
            order[start + r4] * ld, order[start + r5] * ld)


@inline
def _packed_rows_4(base):
    return (base, base + 1, base + 2, base + 3)


@inline
def _packed_rows_6(base):
    return (base, base + 1, base + 2, base + 3, base + 4, base + 5)


# --- epilogues --------------------------------------------------------------------------------------------------
@inline
def _finish_vector(kind, act, out, offset, acc, count, aux, aux_offset, hyper):
    # One vector of a finished tile: the first ``count`` lanes (1..lanes) go to out's elements from offset.
    # aux: the bias (kind _FORWARD, element aux_offset), the previous layer's output y (_INPUT_GRAD, laid out
    # like out), the momentum buffer (_SGD, laid out like out). hyper: _SGD's (lr, momentum, dampening,
    # weight_decay, nesterov, first_step) in out's dtype (the bools as bools).
    L = simd.lanes(out)
    full = count >= L
    zero = simd.zero(out)
    if kind == _FORWARD:
        bias = simd.load(aux, aux_offset) if full else simd.load_partial(aux, aux_offset, count)
        value = simd.add(acc, bias)
        if act == RELU:
            value = simd.max(value, zero)
        elif act == LEAKY_RELU:
            value = simd.select_gt(value, zero, value, simd.mul(simd.broadcast(out.dtype.type(LEAKY_RELU_SLOPE)),
                                                                value))
        # sigmoid and tanh: applied by _activate_row after the row's stores (scalar code, see there)
    elif kind == _INPUT_GRAD:
        y = simd.load(aux, aux_offset) if full else simd.load_partial(aux, aux_offset, count)
        one = simd.broadcast(out.dtype.type(1.0))
        if act == RELU:
            value = simd.select_gt(y, zero, acc, zero)
        elif act == LEAKY_RELU:
            value = simd.select_gt(y, zero, acc, simd.mul(acc, simd.broadcast(out.dtype.type(LEAKY_RELU_SLOPE))))
        elif act == SIGMOID:
            value = simd.mul(acc, simd.mul(y, simd.sub(one, y)))
        elif act == TANH:
            value = simd.mul(acc, simd.sub(one, simd.mul(y, y)))
        else:
            value = acc
    elif hyper is None:  # (forward and input gradient: hyper None prunes the branch below when compiling)
        value = acc
    else:
        lr, momentum, dampening, weight_decay, nesterov, first_step, apply_sgd = hyper
        value = acc  # the weight gradient itself, unless apply_sgd:
        if apply_sgd:
            # An SGD step with gradient acc: pointwise.sgd_update_one lane by lane, in its order of operations
            # (torch.optim.SGD, foreach=False).
            p = simd.load(out, offset) if full else simd.load_partial(out, offset, count)
            g = simd.add(acc, simd.mul(simd.broadcast(weight_decay), p))
            if momentum != 0:
                if first_step:
                    buf = g
                else:
                    v = simd.load(aux, aux_offset) if full else simd.load_partial(aux, aux_offset, count)
                    buf = simd.add(simd.mul(simd.broadcast(momentum), v),
                                   simd.mul(simd.broadcast(out.dtype.type(1.0) - dampening), g))
                if full:
                    simd.store(aux, aux_offset, buf)
                else:
                    simd.store_partial(aux, aux_offset, buf, count)
                if nesterov:
                    g = simd.add(g, simd.mul(simd.broadcast(momentum), buf))
                else:
                    g = buf
            value = simd.sub(p, simd.mul(simd.broadcast(lr), g))
    if full:
        simd.store(out, offset, value)
    else:
        simd.store_partial(out, offset, value, count)


@engine_jit()
def _activate_row(out, row, col, count, act):
    """sigmoid / tanh on out[row, col:col + count], just stored and still in L1: pointwise.activate's two
    branches, called directly, as scalar code (sigmoid's exp is plain arithmetic that LLVM vectorises over the
    loop; tanh is libm's). A compiled function of its own, called once per tile row: inlined into the tile
    epilogues it cost about 2 s of the forward's cold compile."""
    if act == SIGMOID:
        for j in range(col, col + count):
            out[row, j] = sigmoid(out[row, j])
    elif act == TANH:
        for j in range(col, col + count):
            out[row, j] = math.tanh(out[row, j])


@inline
def _finish_tile(kind, act, out, ld_out, row0, n_rows, col, n_cols, accs, aux, ld_aux, hyper):
    # A finished tile (accs: a tuple of rows, each a tuple of vectors) to out's rows row0.. below n_rows (the
    # others repeated a valid row of A: never stored) and columns col.. below n_cols (the last vector masked).
    # Written as loops, so that numba types and lowers _finish_vector ONCE (LLVM unrolls them): the same
    # epilogue written out per accumulator, inlined by numba 12 times, took 100 s to compile (numba deep-copies
    # the inlined IR per call site), and as separate compiled functions 9 s, LLVM re-optimising each one in
    # every library that links it.
    L = simd.lanes(out)
    for t in range(len(accs)):
        row = row0 + t
        if row < n_rows:
            row_accs = accs[t]
            offset = row * ld_out + col
            aux_offset = col if kind == _FORWARD else row * ld_aux + col
            for v in range(len(row_accs)):
                count = min(L, n_cols - (col + v * L))
                if count > 0:
                    _finish_vector(kind, act, out, offset + v * L, row_accs[v], count, aux, aux_offset + v * L,
                                   hyper)
            if kind == _FORWARD and (act == SIGMOID or act == TANH):
                _activate_row(out, row, col, min(len(row_accs) * L, n_cols - col), act)


# The shape's functions, chosen once here (numba then compiles only that shape).
_kernel = _kernel_6x4 if WIDE else _kernel_4x3
_rows = _rows_6 if WIDE else _rows_4
_packed_rows = _packed_rows_6 if WIDE else _packed_rows_4


# --- packing ----------------------------------------------------------------------------------------------------
@engine_jit()
def _pack_rows(panels, base, B, n_rows, n_cols, panel_lo, panel_hi, sums):
    """Panels panel_lo..panel_hi of B (n_rows x n_cols, rows contiguous) into panels[base:]: panel p's row k is
    B[k, p*NR : p*NR + NR] at base + (p * n_rows + k) * NR, zero-padded past n_cols. With ``sums`` (not None),
    sums[j] = B[:, j].sum() for the panels' columns, added in row order (the bias gradient: deterministic).
    k outermost, so B is read row by row, contiguously (0.76 ms for a 1024 x 1024 float32 W on a Zen 3 core,
    against 1.05 with panels outermost)."""
    L = simd.lanes(panels)
    NR = TILE_VECTORS * L
    ld_b = _leading(B)
    zero = simd.zero(panels)
    full_hi = min(panel_hi, n_cols // NR)  # panels before full_hi have all NR columns
    if sums is not None:
        for j in range(panel_lo * NR, min(panel_hi * NR, n_cols)):
            sums[j] = 0
    for k in range(n_rows):
        for p in range(panel_lo, full_hi):
            src = k * ld_b + p * NR
            dst = base + (p * n_rows + k) * NR
            for v in range(TILE_VECTORS):
                x = simd.load(B, src + v * L)
                simd.store(panels, dst + v * L, x)
                if sums is not None:
                    j = p * NR + v * L
                    simd.store(sums, j, simd.add(simd.load(sums, j), x))
        for p in range(max(panel_lo, full_hi), panel_hi):  # the last panel, when n_cols is not a multiple of NR
            src = k * ld_b + p * NR
            dst = base + (p * n_rows + k) * NR
            for v in range(TILE_VECTORS):
                count = n_cols - p * NR - v * L
                if count >= L:
                    x = simd.load(B, src + v * L)
                elif count > 0:
                    x = simd.load_partial(B, src + v * L, count)
                else:
                    x = zero
                simd.store(panels, dst + v * L, x)
                if sums is not None:
                    j = p * NR + v * L
                    if count >= L:
                        simd.store(sums, j, simd.add(simd.load(sums, j), x))
                    elif count > 0:
                        simd.store_partial(sums, j, simd.add(simd.load_partial(sums, j, count), x), count)


@engine_jit()
def _pack_columns(panels, base, W, n_rows, n_cols, panel_lo, panel_hi):
    """Panels panel_lo..panel_hi of W^T (n_cols x n_rows) into panels[base:]: panel p's row k holds
    W[p*NR + t, k] for t < NR (0 past n_rows) at base + (p * n_cols + k) * NR. The transposing copy the input
    gradient needs (its B operand is W^T): lanes x lanes blocks of W loaded by rows and transposed in
    registers (simd.load_transposed), scalar copies at the edges. 1024 x 1024 float32 on a Zen 3 core:
    2.25 ms as scalar copies (blocked or not), against 0.84 for the same amount of contiguous copying."""
    L = simd.lanes(panels)
    NR = TILE_VECTORS * L
    ld_w = _leading(W)
    zero = panels.dtype.type(0.0)
    full_cols = n_cols // L * L
    for p in range(panel_lo, panel_hi):
        dst = base + p * n_cols * NR
        for block in range(TILE_VECTORS):
            row0 = p * NR + block * L
            if row0 + L <= n_rows:  # L whole rows of W: transposed L x L blocks, then the last columns
                for k0 in range(0, full_cols, L):
                    columns = simd.load_transposed(W, row0 * ld_w + k0, ld_w)
                    for kk in range(L):
                        simd.store(panels, dst + (k0 + kk) * NR + block * L, columns[kk])
                for k in range(full_cols, n_cols):
                    for t in range(L):
                        panels[dst + k * NR + block * L + t] = W[row0 + t, k]
            else:  # the panel's last rows (zeros past n_rows)
                for k in range(n_cols):
                    for t in range(L):
                        row = row0 + t
                        panels[dst + k * NR + block * L + t] = W[row, k] if row < n_rows else zero


@engine_jit()
def _pack_broadcast_panels(panels, base, inp, n_rows, n_cols, order, start, group_lo, group_hi):
    """The weight gradient's A = inp^T in TILE_ROWS-wide panels: group q's element (k, t) is inp[row k,
    q*TILE_ROWS + t] (0 past n_cols) at base + (q * n_rows + k) * TILE_ROWS; row k is order[start + k] with
    ``order``. The micro-kernel then broadcasts TILE_ROWS consecutive numbers per k, instead of touching a new
    row of inp per k (a new page for a 1024-wide layer).

    Vector copies: a masked load of the group's TILE_ROWS numbers, a whole-vector store whose lanes past
    TILE_ROWS land in the following k's slots (rewritten next), a masked store where the whole vector would
    reach past the group's last slot (into the next group, packed already or by another task). Groups go 16 at a
    time for every k (4 and all of them were slower). 512 x 1024 float32 on a Zen 3 core: 1.10 ms as scalar
    copies, 1.0-1.2 ms as these vector copies (memory-bound); 128 x 784: 0.15 -> 0.08 ms."""
    L = simd.lanes(panels)
    zero = simd.zero(panels)
    ld_inp = _leading(inp)
    for chunk in range(group_lo, group_hi, 16):
        chunk_end = min(chunk + 16, group_hi)
        for k in range(n_rows):
            src = (k if order is None else order[start + k]) * ld_inp
            for q in range(chunk, chunk_end):
                dst = base + (q * n_rows + k) * TILE_ROWS
                for c in range(0, TILE_ROWS, L):
                    col = q * TILE_ROWS + c
                    width = min(L, TILE_ROWS - c)
                    count = min(width, n_cols - col)
                    x = simd.load_partial(inp, src + col, count) if count > 0 else zero
                    # A whole vector only while it stays inside group q's slots: with 16 lanes and 6-number
                    # slots the spill reaches two slots ahead, past the group's end for its last two k.
                    if width == L or k * TILE_ROWS + c + L <= n_rows * TILE_ROWS:
                        simd.store(panels, dst + c, x)
                    else:
                        simd.store_partial(panels, dst + c, x, width)


# --- tile workers -------------------------
@engine_jit()
def _forward_task(out, inp, order, start, weight, panels, bias, act, tile_lo, tile_hi, panel_lo, panel_hi, pack_lo,
                  pack_hi):
    """One task of dense_forward: packs panels pack_lo..pack_hi of the weight (those only this task reads),
    then act(inp @ weight + bias) for row tiles tile_lo..tile_hi and panels panel_lo..panel_hi of out."""
    depth = weight.shape[0]
    _pack_rows(panels, depth - depth, weight, depth, weight.shape[1], pack_lo, pack_hi, None)
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    NR = TILE_VECTORS * simd.lanes(out)
    ld_out = _leading(out)
    ld_inp = _leading(inp)
    panel_group = _panel_group(depth, NR, out.itemsize)
    narrow = _narrow_last_panel(n_cols, NR, simd.lanes(out), panel_hi)
    wide_hi = panel_hi - 1 if narrow else panel_hi
    for group in range(panel_lo, wide_hi, panel_group):
        group_end = min(group + panel_group, wide_hi)
        for tile in range(tile_lo, tile_hi):
            row0 = tile * TILE_ROWS
            rows = _rows(row0, n_rows, ld_inp, order, start)
            for p in range(group, group_end):
                accs = _kernel(inp, rows, 1, panels, p * depth * NR, depth)
                _finish_tile(_FORWARD, act, out, ld_out, row0, n_rows, p * NR, n_cols, accs, bias, 0, None)
    if narrow and wide_hi >= panel_lo:
        row_end = min(tile_hi * TILE_ROWS, n_rows)  # this task's rows only
        for row0 in range(tile_lo * TILE_ROWS, row_end, NARROW_ROWS):
            rows = _rows_6(row0, row_end, ld_inp, order, start)
            accs = _kernel_narrow(inp, rows, 1, panels, wide_hi * depth * NR, depth)
            _finish_tile(_FORWARD, act, out, ld_out, row0, row_end, wide_hi * NR, n_cols, accs, bias, 0, None)


@engine_jit()
def _weight_grad_task(out, velocity, sums, dout, inp, order, start, panels, hyper, a_packed, tile_lo, tile_hi,
                      panel_lo, panel_hi, pack_tile_lo, pack_tile_hi, pack_lo, pack_hi):
    """One task of the weight gradient: packs panels pack_lo..pack_hi of dout (with their column sums into
    ``sums``) and inp^T's groups pack_tile_lo..pack_tile_hi (the parts only this task reads), then inp^T @ dout
    for row tiles tile_lo..tile_hi and panels panel_lo..panel_hi of out (n_in, n_out). dout's panels lie in
    panels from 0, inp^T's after them. hyper = (lr, momentum, dampening, weight_decay, nesterov, first_step,
    apply): with apply False out = the gradient, with apply True out (the weights) and velocity take an SGD
    step with it instead (one compiled worker for both: a runtime branch per vector costs nothing measurable,
    a second compiled worker about 8 s of cold compile)."""
    depth = dout.shape[0]
    NR = TILE_VECTORS * simd.lanes(out)
    a_base = depth * ((out.shape[1] + NR - 1) // NR) * NR
    _pack_rows(panels, depth - depth, dout, depth, out.shape[1], pack_lo, pack_hi, sums)
    _pack_broadcast_panels(panels, a_base, inp, depth, out.shape[0], order, start, pack_tile_lo, pack_tile_hi)
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    ld_out = _leading(out)
    ld_velocity = _leading(velocity)
    panel_group = _panel_group(depth, NR, out.itemsize)
    # A: inp^T's packed groups (TILE_ROWS numbers per k) or inp as stored (tile row t broadcasts
    # inp[k, row0 + t], a_step = inp's row stride); one 2-D array either way, so one kernel call site.
    if a_packed:
        n_groups = (n_rows + TILE_ROWS - 1) // TILE_ROWS
        A = panels[a_base:a_base + n_groups * depth * TILE_ROWS].reshape((n_groups * depth, TILE_ROWS))
        a_step = TILE_ROWS
    else:
        A = inp
        a_step = _leading(inp)
    narrow = (not a_packed) and _narrow_last_panel(n_cols, NR, simd.lanes(out), panel_hi)
    wide_hi = panel_hi - 1 if narrow else panel_hi
    for group in range(panel_lo, wide_hi, panel_group):
        group_end = min(group + panel_group, wide_hi)
        for tile in range(tile_lo, tile_hi):
            row0 = tile * TILE_ROWS
            rows = _packed_rows(tile * depth * TILE_ROWS) if a_packed else _rows(row0, n_rows, 1, None, 0)
            for p in range(group, group_end):
                accs = _kernel(A, rows, a_step, panels, p * depth * NR, depth)
                _finish_tile(_STORE, IDENTITY, out, ld_out, row0, n_rows, p * NR, n_cols, accs, velocity,
                             ld_velocity, hyper)
    if narrow and wide_hi >= panel_lo:
        row_end = min(tile_hi * TILE_ROWS, n_rows)
        for row0 in range(tile_lo * TILE_ROWS, row_end, NARROW_ROWS):
            rows = _rows_6(row0, row_end, 1, None, 0)
            accs = _kernel_narrow(A, rows, a_step, panels, wide_hi * depth * NR, depth)
            _finish_tile(_STORE, IDENTITY, out, ld_out, row0, row_end, wide_hi * NR, n_cols, accs, velocity,
                         ld_velocity, hyper)


@engine_jit()
def _input_grad_task(dinp, dout, weight, panels, y, act, tile_lo, tile_hi, panel_lo, panel_hi, pack_lo, pack_hi):
    """One task of dense_backward_input: packs panels pack_lo..pack_hi of weight^T (those only this task
    reads), then (dout @ weight^T) * act'(y) for row tiles tile_lo..tile_hi and panels panel_lo..panel_hi of
    dinp (B, n_in); y (B, n_in) is the previous layer's output."""
    depth = weight.shape[1]
    _pack_columns(panels, depth - depth, weight, weight.shape[0], depth, pack_lo, pack_hi)
    n_rows = dinp.shape[0]
    n_cols = dinp.shape[1]
    NR = TILE_VECTORS * simd.lanes(dinp)
    panel_group = _panel_group(depth, NR, dinp.itemsize)
    ld_dinp = _leading(dinp)
    ld_dout = _leading(dout)
    ld_y = _leading(y)
    narrow = _narrow_last_panel(n_cols, NR, simd.lanes(dinp), panel_hi)
    wide_hi = panel_hi - 1 if narrow else panel_hi
    for group in range(panel_lo, wide_hi, panel_group):
        group_end = min(group + panel_group, wide_hi)
        for tile in range(tile_lo, tile_hi):
            row0 = tile * TILE_ROWS
            rows = _rows(row0, n_rows, ld_dout, None, 0)
            for p in range(group, group_end):
                accs = _kernel(dout, rows, 1, panels, p * depth * NR, depth)
                _finish_tile(_INPUT_GRAD, act, dinp, ld_dinp, row0, n_rows, p * NR, n_cols, accs, y, ld_y, None)
    if narrow and wide_hi >= panel_lo:
        row_end = min(tile_hi * TILE_ROWS, n_rows)
        for row0 in range(tile_lo * TILE_ROWS, row_end, NARROW_ROWS):
            rows = _rows_6(row0, row_end, ld_dout, None, 0)
            accs = _kernel_narrow(dout, rows, 1, panels, wide_hi * depth * NR, depth)
            _finish_tile(_INPUT_GRAD, act, dinp, ld_dinp, row0, row_end, wide_hi * NR, n_cols, accs, y, ld_y, None)


@inline
def _panel_group(depth, NR, itemsize):
    # Panels per sweep: as many as fit PANEL_GROUP_BYTES, at least one.
    return max(1, PANEL_GROUP_BYTES // max(1, depth * NR * itemsize))


@inline
def _task_grid(n_tiles, n_panels, n_threads, a_size, b_size):
    # (row tasks, column tasks) with row tasks x column tasks = n_threads where the grid allows (each thread one
    # rectangle of whole tiles), the factorisation that reads least: every row task streams all of its panels
    # of B (b_size elements in all), every column task all of its rows of A (a_size).
    best_rows = 1
    best_cols = 1
    best_cost = -1
    for rows in range(1, n_threads + 1):
        if n_threads % rows == 0:
            cols = n_threads // rows
            if rows <= n_tiles and cols <= n_panels:
                cost = rows * b_size + cols * a_size
                if best_cost < 0 or cost < best_cost:
                    best_rows, best_cols, best_cost = rows, cols, cost
    if best_cost < 0:  # too few tiles for one task per thread: as many tasks as the grid has
        best_rows = min(n_threads, n_tiles)
        best_cols = max(1, min(n_threads // best_rows, n_panels))
    return best_rows, best_cols


@inline
def _check_panels(panels, needed):
    _check_vector(panels)
    if panels.shape[0] < needed:
        raise ValueError("fastbp.kernels.gemm: panels is shorter than workspace_size(batch, n_in, n_out, dtype)")


# --- public kernels ----------------------------------------------------------------------------------------------
@engine_jit(parallel=True)
def dense_forward(out, inp, weight, bias, act, panels, order=None, start=0):
    """out = act(inp @ weight + bias), overwritten, the bias and activation fused into each tile's stores.

    Parameters
    ----------
    out : (B, n_out) array, rows contiguous
    inp : (B, n_in) array, rows contiguous; with ``order``, any (n, n_in) array whose rows
        ``order[start:start + B]`` are this batch (the first layer reading a shuffled data set, no copy).
    weight : (n_in, n_out) array as stored in fastbp's flat parameters, rows contiguous.
    bias : (n_out,) array.
    act : int, a pointwise activation code (IDENTITY, SIGMOID, TANH, RELU, LEAKY_RELU).
    panels : 1-D array of at least ``workspace_size(B, n_in, n_out, dtype)`` elements (overwritten: the
        weight in panel order).
    order : optional int64 array of row indices into ``inp``; start : int, the batch's first position in it.

    All float arrays share one dtype (float32 or float64). Each output is summed over n_in in index order by
    one task, so the result does not depend on the number of threads.
    """
    n_rows = out.shape[0]
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    if inp.shape[1] != n_in or out.shape[1] != n_out or bias.shape[0] != n_out:
        raise ValueError("dense_forward: shapes do not match (out (B, n_out), inp (B, n_in), weight (n_in, n_out))")
    if order is None and inp.shape[0] != n_rows:
        raise ValueError("dense_forward: inp and out must have the same number of rows")
    _check_rows(out)
    _check_rows(inp)
    _check_rows(weight)
    _check_vector(bias)
    NR = TILE_VECTORS * simd.lanes(out)
    n_panels = (n_out + NR - 1) // NR
    _check_panels(panels, n_panels * NR * n_in)
    if n_rows == 0 or n_out == 0:
        return
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    zero = n_rows - n_rows  # a variable 0: a literal would compile a second specialisation of the worker
    n_threads = _thread_count()
    if n_threads == 1 or n_rows * n_in * n_out < PARALLEL_MIN_WORK:
        _forward_task(out, inp, order, start + zero, weight, panels, bias, act, zero, n_tiles, zero, n_panels, zero,
                      n_panels)
        return
    row_tasks, col_tasks = _task_grid(n_tiles, n_panels, n_threads, n_rows * n_in, n_in * n_out)
    shared = row_tasks > 1  # tasks share panels: pack them all first, here (1/B of the product's work)
    if shared:
        _pack_rows(panels, zero, weight, n_in, n_out, zero, n_panels, None)
    # ONE parallel loop (each numba prange is a separately compiled function that links the whole worker)
    for task in prange(row_tasks * col_tasks):
        r = task // col_tasks
        c = task % col_tasks
        panel_lo = c * n_panels // col_tasks
        panel_hi = (c + 1) * n_panels // col_tasks
        _forward_task(out, inp, order, start + zero, weight, panels, bias, act, r * n_tiles // row_tasks,
                      (r + 1) * n_tiles // row_tasks, panel_lo, panel_hi, panel_lo, panel_lo if shared else panel_hi)


@engine_jit(parallel=True)
def _weight_grad(dweight, velocity, sums, dout, inp, panels, order, start, hyper):
    # The weight gradient, or its SGD step (hyper's last entry True), with the bias gradient into ``sums``. Layout of
    # panels: dout's panels (batch x NR-padded n_out) from 0, then inp^T's TILE_ROWS-wide panels.
    n_in = dweight.shape[0]
    n_out = dweight.shape[1]
    batch = dout.shape[0]
    NR = TILE_VECTORS * simd.lanes(dweight)
    n_panels = (n_out + NR - 1) // NR
    n_tiles = (n_in + TILE_ROWS - 1) // TILE_ROWS
    zero = batch - batch
    # inp^T is packed (TILE_ROWS numbers per k, contiguous) when there are many panels of dout to reuse it and
    # inp's rows are a page or more apart or the batch is long, or to read rows through ``order``; else tile
    # row t broadcasts inp[k, row0 + t] as stored. Zen 3 core, float32, one thread, ms packed / as stored:
    # 512 x 1024 -> 1024 15.3 / 21.2 (rows 4 KiB apart: one L1 set, 128 lines of L2), 128 x 1024 -> 1024
    # 4.3 / 5.4, 512 x 256 -> 256 1.14 / 1.18, 128 x 784 -> 256 0.83 / 0.79, 128 x 256 -> 256 0.27 / 0.26;
    # 512 x 1024 -> 10 (one panel) 0.36x OpenBLAS packed, 1.1x as stored.
    a_packed = order is not None or (n_panels > 2 and (batch > PACK_BROADCAST_MIN_BATCH
                                                       or n_in * dweight.itemsize >= 4096))
    n_a_tiles = n_tiles if a_packed else zero
    n_threads = _thread_count()
    if n_threads == 1 or batch * n_in * n_out < PARALLEL_MIN_WORK:
        _weight_grad_task(dweight, velocity, sums, dout, inp, order, start, panels, hyper, a_packed, zero, n_tiles,
                          zero, n_panels, zero, n_a_tiles, zero, n_panels)
        return
    row_tasks, col_tasks = _task_grid(n_tiles, n_panels, n_threads, batch * n_in, batch * n_out)
    shared_b = row_tasks > 1  # tasks share dout's panels: pack them first, here
    shared_a = col_tasks > 1 and a_packed  # tasks share inp^T's groups
    if shared_b:
        _pack_rows(panels, zero, dout, batch, n_out, zero, n_panels, sums)
    if shared_a:
        _pack_broadcast_panels(panels, batch * n_panels * NR, inp, batch, n_in, order, start, zero, n_tiles)
    for task in prange(row_tasks * col_tasks):
        r = task // col_tasks
        c = task % col_tasks
        tile_lo = r * n_tiles // row_tasks
        tile_hi = (r + 1) * n_tiles // row_tasks
        panel_lo = c * n_panels // col_tasks
        panel_hi = (c + 1) * n_panels // col_tasks
        _weight_grad_task(dweight, velocity, sums, dout, inp, order, start, panels, hyper, a_packed, tile_lo, tile_hi,
                          panel_lo, panel_hi, tile_lo, tile_lo if shared_a or not a_packed else tile_hi, panel_lo,
                          panel_lo if shared_b else panel_hi)


@inline
def _check_weight_grad(dweight, dbias, dout, inp, order, panels):
    n_in = dweight.shape[0]
    n_out = dweight.shape[1]
    batch = dout.shape[0]
    if dout.shape[1] != n_out or inp.shape[1] != n_in or dbias.shape[0] != n_out:
        raise ValueError("dense_backward_params: shapes do not match (dweight (n_in, n_out), dout (B, n_out), "
                         "inp (B, n_in), dbias (n_out,))")
    if order is None and inp.shape[0] != batch:
        raise ValueError("dense_backward_params: inp and dout must have the same number of rows")
    _check_rows(dweight)
    _check_rows(dout)
    _check_rows(inp)
    _check_vector(dbias)
    NR = TILE_VECTORS * simd.lanes(dweight)
    n_panels = (n_out + NR - 1) // NR
    n_tiles = (n_in + TILE_ROWS - 1) // TILE_ROWS
    _check_panels(panels, batch * (n_panels * NR + n_tiles * TILE_ROWS) + n_panels * NR)


@engine_jit()
def dense_backward_params(dweight, dbias, dout, inp, panels, order=None, start=0):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten.

    Parameters
    ----------
    dweight : (n_in, n_out) array; dbias : (n_out,) array.
    dout : (B, n_out) array, d loss / d this layer's pre-activation.
    inp : (B, n_in) array, this layer's input; with ``order``, any (n, n_in) array whose rows
        ``order[start:start + B]`` are this batch's inputs.
    panels : 1-D array of at least ``workspace_size(B, n_in, n_out, dtype)`` elements (overwritten).
    order, start : as in dense_forward.

    Every sum runs over the batch in row order (dbias as well): results do not depend on the thread count.
    """
    _check_weight_grad(dweight, dbias, dout, inp, order, panels)
    if dweight.shape[0] == 0 or dweight.shape[1] == 0:
        return
    T = dweight.dtype.type
    off = dweight.shape[0] < 0  # a runtime False: a literal would type the tuple differently (a second compile)
    no_step = (T(0.0), T(0.0), T(0.0), T(0.0), off, off, off)  # see _weight_grad_task: apply = False
    _weight_grad(dweight, dweight, dbias, dout, inp, panels, order, start + 0 * dweight.shape[0], no_step)


@engine_jit()
def dense_backward_params_sgd(weight, bias, velocity_w, velocity_b, dout, inp, panels, lr, momentum, dampening,
                              weight_decay, nesterov, first_step, order=None, start=0):
    """One torch.optim.SGD step of a layer's weight and bias with the gradients inp.T @ dout and dout.sum(0),
    fused into the weight gradient's tiles: the gradient never goes to memory (pointwise.sgd_update_one's
    arithmetic, lane by lane).

    Parameters
    ----------
    weight : (n_in, n_out) array, updated in place; bias : (n_out,) array, updated in place.
    velocity_w, velocity_b : the momentum buffers, shaped like weight and bias, updated in place (not read on
        the first step or without momentum).
    dout, inp, order, start : as in dense_backward_params.
    panels : 1-D array of at least ``workspace_size(B, n_in, n_out, dtype)`` elements (overwritten).
    lr, momentum, dampening, weight_decay : scalars in the parameters' dtype; nesterov, first_step : bools.

    The layer's input gradient needs the weight BEFORE this step: call dense_backward_input first.
    """
    _check_weight_grad(weight, bias, dout, inp, order, panels)
    if velocity_w.shape[0] != weight.shape[0] or velocity_w.shape[1] != weight.shape[1] or (
            velocity_b.shape[0] != bias.shape[0]):
        raise ValueError("dense_backward_params_sgd: the velocities must be shaped like weight and bias")
    _check_rows(velocity_w)
    _check_vector(velocity_b)
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    if n_in == 0 or n_out == 0:
        return
    batch = dout.shape[0]
    NR = TILE_VECTORS * simd.lanes(weight)
    n_panels = (n_out + NR - 1) // NR
    n_tiles = (n_in + TILE_ROWS - 1) // TILE_ROWS
    sums_start = batch * (n_panels * NR + n_tiles * TILE_ROWS)
    sums = panels[sums_start:sums_start + n_out]
    T = weight.dtype.type  # one tuple type whatever the caller's scalar types: one compiled worker
    on = weight.shape[0] >= 0  # a runtime True (see dense_backward_params)
    hyper = (T(lr), T(momentum), T(dampening), T(weight_decay), bool(nesterov), bool(first_step), on)
    _weight_grad(weight, velocity_w, sums, dout, inp, panels, order, start + 0 * weight.shape[0], hyper)
    for j in range(n_out):
        sgd_update_one(bias, velocity_b, sums, j, hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5])


@engine_jit(parallel=True)
def dense_backward_input(dinp, dout, weight, inp, inp_act, panels):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: the gradient w.r.t. the PREVIOUS layer's
    pre-activation, with that layer's activation derivative (pointwise.activation_grad, from its output
    ``inp``) fused into each tile's stores.

    Parameters
    ----------
    dinp : (B, n_in) array; dout : (B, n_out) array; weight : (n_in, n_out) array as stored.
    inp : (B, n_in) array, the previous layer's output; inp_act : int, that layer's activation code.
    panels : 1-D array of at least ``workspace_size(B, n_in, n_out, dtype)`` elements (overwritten: weight.T
        in panel order, the one transposing copy, n_in x n_out elements).

    Each output is summed over n_out in index order by one task: results do not depend on the thread count.
    """
    batch = dout.shape[0]
    n_in = weight.shape[0]
    n_out = weight.shape[1]
    if dout.shape[1] != n_out or dinp.shape[1] != n_in or inp.shape[1] != n_in or dinp.shape[0] != batch or (
            inp.shape[0] != batch):
        raise ValueError("dense_backward_input: shapes do not match (dinp (B, n_in), dout (B, n_out), "
                         "weight (n_in, n_out), inp (B, n_in))")
    _check_rows(dinp)
    _check_rows(dout)
    _check_rows(weight)
    _check_rows(inp)
    NR = TILE_VECTORS * simd.lanes(dinp)
    n_panels = (n_in + NR - 1) // NR
    _check_panels(panels, n_panels * NR * n_out)
    if batch == 0 or n_in == 0:
        return
    n_tiles = (batch + TILE_ROWS - 1) // TILE_ROWS
    zero = batch - batch
    n_threads = _thread_count()
    if n_threads == 1 or batch * n_in * n_out < PARALLEL_MIN_WORK:
        _input_grad_task(dinp, dout, weight, panels, inp, inp_act, zero, n_tiles, zero, n_panels, zero, n_panels)
        return
    row_tasks, col_tasks = _task_grid(n_tiles, n_panels, n_threads, batch * n_out, n_in * n_out)
    shared = row_tasks > 1
    if shared:
        _pack_columns(panels, zero, weight, n_in, n_out, zero, n_panels)
    for task in prange(row_tasks * col_tasks):
        r = task // col_tasks
        c = task % col_tasks
        panel_lo = c * n_panels // col_tasks
        panel_hi = (c + 1) * n_panels // col_tasks
        _input_grad_task(dinp, dout, weight, panels, inp, inp_act, r * n_tiles // row_tasks,
                         (r + 1) * n_tiles // row_tasks, panel_lo, panel_hi, panel_lo, panel_lo if shared else panel_hi)


# --- references (serial, obviously right; no fast-math) ------------------------------------------------------------
def _reference_jit(func):
    return njit(cache=CACHE)(func)


@_reference_jit
def dense_forward_naive(out, inp, weight, bias, act, order=None, start=0):
    """dense_forward's reference: out[i, j] = act(bias[j] + sum_k inp[row i, k] * weight[k, j])."""
    for i in range(out.shape[0]):
        row = i if order is None else order[start + i]
        for j in range(weight.shape[1]):
            acc = bias[j]
            for k in range(weight.shape[0]):
                acc += inp[row, k] * weight[k, j]
            out[i, j] = activate(acc, act)


@_reference_jit
def dense_backward_params_naive(dweight, dbias, dout, inp, order=None, start=0):
    """dense_backward_params' reference: dweight[k, j] = sum_i inp[row i, k] * dout[i, j], dbias = dout.sum(0)."""
    for k in range(dweight.shape[0]):
        for j in range(dweight.shape[1]):
            acc = dweight.dtype.type(0.0)
            for i in range(dout.shape[0]):
                acc += inp[i if order is None else order[start + i], k] * dout[i, j]
            dweight[k, j] = acc
    for j in range(dbias.shape[0]):
        acc = dbias.dtype.type(0.0)
        for i in range(dout.shape[0]):
            acc += dout[i, j]
        dbias[j] = acc


@_reference_jit
def dense_backward_params_sgd_naive(weight, bias, velocity_w, velocity_b, dweight, dbias, dout, inp, lr, momentum,
                                    dampening, weight_decay, nesterov, first_step, order=None, start=0):
    """dense_backward_params_sgd's reference: the gradients into dweight, dbias (scratch, overwritten), then
    pointwise.sgd_update_one over every element of weight and bias."""
    dense_backward_params_naive(dweight, dbias, dout, inp, order, start)
    n = weight.shape[0] * weight.shape[1]
    flat_w = weight.reshape(n)
    flat_v = velocity_w.reshape(n)
    flat_g = dweight.reshape(n)
    for i in range(n):
        sgd_update_one(flat_w, flat_v, flat_g, i, lr, momentum, dampening, weight_decay, nesterov, first_step)
    for j in range(bias.shape[0]):
        sgd_update_one(bias, velocity_b, dbias, j, lr, momentum, dampening, weight_decay, nesterov, first_step)


@_reference_jit
def dense_backward_input_naive(dinp, dout, weight, inp, inp_act):
    """dense_backward_input's reference: dinp[i, k] = (sum_j dout[i, j] * weight[k, j]) * act'(inp[i, k])."""
    for i in range(dout.shape[0]):
        for k in range(weight.shape[0]):
            acc = dinp.dtype.type(0.0)
            for j in range(weight.shape[1]):
                acc += dout[i, j] * weight[k, j]
            dinp[i, k] = acc * activation_grad(inp[i, k], inp_act)
