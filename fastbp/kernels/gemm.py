"""fastbp's CPU product engine: register-blocked dense-layer products on explicit SIMD vectors (see simd.py).

Its entry is ``product(kind, act, out, a, b, vec, y, panels)`` (one of the three products below, with its
epilogue; OVERWRITES out and allocates nothing), called by symbol from fastbp.kernels.cpu's drivers and from
that module's vocabulary kernels (``dense_forward`` ...), which check their operands, copy any whose rows are not
contiguous (or that are read-only) and give it a workspace. ``workspace_size(batch, n_in, n_out, dtype)``
is the length of the ``panels`` buffer it needs (``forward_workspace``, ``backward_params_workspace`` and
``backward_input_workspace`` give each kind's own length inside numba code).

How a product runs
    Every product is C = A @ B with A logically (rows of C x depth) and B (depth x columns of C):
        forward          out (B, n_out) = act(inp @ weight + bias)   A = inp as stored, B = weight
        weight gradient  dweight (n_in, n_out) = inp^T @ dout         A = inp^T, B = dout (+ its column sums)
        input gradient   dinp (B, n_in) = (dout @ weight^T) * act'(y) A = dout as stored, B = weight^T
    C is a grid of TILE_ROWS x NR tiles (NR = TILE_VECTORS vectors), each held in vector registers across the
    WHOLE depth: per k, TILE_VECTORS vector loads of B, TILE_ROWS broadcasts of A, TILE_ROWS * TILE_VECTORS
    FMAs (the broadcast/outer-product form), then the product's epilogue (bias and activation, activation
    derivative, or a plain store) on the tile while it is still in registers.
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

Compiled once: the three products share one worker (``_task``: packing, the tile loops, the epilogues, the
product kind a run-time argument) and one parallel region (``_run_parallel``, the module's only prange), so a
first fit compiles the engine once per dtype instead of once per product (AMD EPYC Zen 4, cold, the three
products of a fit: 16.4 s as three workers and three drivers). A branch on the kind per stored vector costs
nothing measurable next to the depth x TILE_ROWS x TILE_VECTORS FMAs before it.

Parallelism: the tile grid is split into numba.get_num_threads() rectangles of whole tiles (rows x panels, the
split that reads the least), one task each: every output belongs to one task and is summed over all of k
in order by the same micro-kernel, so results are bit-identical for any thread count. Below
PARALLEL_MIN_WORK multiply-adds, or on one thread, everything runs on the calling thread (and so does the
drivers' product until its parallel region is compiled: see ``product`` below).

Vector width: fixed at import by simd.VECTOR_BITS (the target numba compiles for). The disk cache keys on
the CPU name and features, so it separates widths by itself, except under FASTBP_SIMD_BITS: then nothing is
cached (a cached kernel of another width would disagree with workspace_size).
"""
from __future__ import annotations

import math

import numba
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _jit
from .._jit import inline
from . import simd
from .pointwise import LEAKY_RELU, LEAKY_RELU_SLOPE, RELU, SIGMOID, TANH, sigmoid

# --- the tile shape, from the vector width ---------------------------------------------------------------------
WIDE = simd.VECTOR_BITS >= 512
TILE_ROWS = 6 if WIDE else 4  # MR: rows of C per tile (broadcasts of A per k)
TILE_VECTORS = 4 if WIDE else 3  # vectors of C per tile row (loads of B per k)
# The weight gradient packs inp^T only for batches longer than this (see _product_shape).
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

# The product kinds (run-time values: see "Compiled once" above).
FORWARD = 0  # out = act(inp @ weight + bias)
WEIGHT_GRAD = 1  # out = inp^T @ dout, and dout's column sums (the bias gradient)
INPUT_GRAD = 2  # out = (dout @ weight^T) * act'(y), y the previous layer's stored output

# The floating-point freedoms of every CPU kernel (fastbp._jit.FAST: reassociation and contraction for the scalar
# epilogue loops; the vector operations of simd carry no flags).
FAST = _jit.FAST
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


def engine_jit(parallel=False, **options):
    """``_jit.cpu_jit`` with this module's fast-math freedoms, cached unless FASTBP_SIMD_BITS forces a width."""
    return _jit.cpu_jit(parallel=parallel, cache=CACHE, **FAST, **options)


@inline
def _runtime(code):
    # A constant (a kind, an activation code from numba code) as a plain int64: numba compiles a separate
    # specialisation for each literal argument value (Literal[int]), which would compile the engine once per
    # kind and code. Measured for activation codes: the engine compiled for a literal code also ran 1.2-2.3x
    # slower (Intel Xeon, AVX-512: 147 against 172 GFLOP/s at 512x1024x1024).
    return code + 0


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
    and inp (batch x (NR-padded n_out + TILE_ROWS-padded n_in))."""
    nr = tile_columns(dtype)
    forward = n_in * _round_up(n_out, nr)
    backward_input = n_out * _round_up(n_in, nr)
    backward_params = batch * (_round_up(n_out, nr) + _round_up(n_in, TILE_ROWS))
    return int(max(forward, backward_input, backward_params))


@inline
def forward_workspace(n_in, n_out, like):
    """Elements of ``panels`` the forward needs for a layer of n_in -> n_out units; ``like`` is any array of
    the operands' dtype (numba code only: the in-kernel form of workspace_size's forward term)."""
    NR = TILE_VECTORS * simd.lanes(like)
    return n_in * ((n_out + NR - 1) // NR * NR)


@inline
def backward_params_workspace(batch, n_in, n_out, like):
    """Elements of ``panels`` the weight gradient needs: dout's panels and inp^T's panels."""
    NR = TILE_VECTORS * simd.lanes(like)
    return batch * ((n_out + NR - 1) // NR * NR + (n_in + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS)


@inline
def backward_input_workspace(n_in, n_out, like):
    """Elements of ``panels`` the input gradient needs: weight^T in panel order."""
    NR = TILE_VECTORS * simd.lanes(like)
    return n_out * ((n_in + NR - 1) // NR * NR)


@inline
def _leading(a):
    # Elements between a 2-D array's rows (its rows must be contiguous: product's callers make them so).
    return a.strides[0] // a.itemsize


@inline
def _depth(kind, b):
    # The summed axis of the product ``kind``: b is the weight (n_in, n_out) for FORWARD (n_in), dout (B, n_out)
    # for WEIGHT_GRAD (B), the weight again for INPUT_GRAD (n_out).
    return b.shape[1] if kind == INPUT_GRAD else b.shape[0]


# --- micro-kernels ------------------------------------------------------------------------------------------------
# C tile = sum over k of (column k of the A tile) x (row k of a B panel). A's element (t, k) is at
# rows[t] + k * a_step (a_step 1: rows of A as stored; TILE_ROWS: a packed panel); the panel's row k is the
# NR elements from p_off + k * NR. Accumulators start at zero and stay in registers for all k_count terms, then
# go to ``buf`` (the task's tile slot, see _task), row t's vector v at (t * TILE_VECTORS + v) * lanes, for the
# epilogue (_finish) to read back from L1: an epilogue written as loops over a slot, for both kernel shapes and
# every product kind, compiles in a third of the time of one unrolled over the accumulators (1.3 s a call site
# on an AMD EPYC Zen 4). Kernels and epilogue are inlined into _task, one call site each: as compiled functions
# of their own, their two calls a tile (some 40 arguments each: an array is passed field by field) cost the W2
# epoch 10-20%.
@inline
def _kernel_4x3(buf, A, rows, a_step, P, p_off, k_count):
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
    simd.store(buf, 0, c00)
    simd.store(buf, L, c01)
    simd.store(buf, 2 * L, c02)
    simd.store(buf, 3 * L, c10)
    simd.store(buf, 4 * L, c11)
    simd.store(buf, 5 * L, c12)
    simd.store(buf, 6 * L, c20)
    simd.store(buf, 7 * L, c21)
    simd.store(buf, 8 * L, c22)
    simd.store(buf, 9 * L, c30)
    simd.store(buf, 10 * L, c31)
    simd.store(buf, 11 * L, c32)


@inline
def _kernel_6x4(buf, A, rows, a_step, P, p_off, k_count):
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
    simd.store(buf, 0, c00)
    simd.store(buf, L, c01)
    simd.store(buf, 2 * L, c02)
    simd.store(buf, 3 * L, c03)
    simd.store(buf, 4 * L, c10)
    simd.store(buf, 5 * L, c11)
    simd.store(buf, 6 * L, c12)
    simd.store(buf, 7 * L, c13)
    simd.store(buf, 8 * L, c20)
    simd.store(buf, 9 * L, c21)
    simd.store(buf, 10 * L, c22)
    simd.store(buf, 11 * L, c23)
    simd.store(buf, 12 * L, c30)
    simd.store(buf, 13 * L, c31)
    simd.store(buf, 14 * L, c32)
    simd.store(buf, 15 * L, c33)
    simd.store(buf, 16 * L, c40)
    simd.store(buf, 17 * L, c41)
    simd.store(buf, 18 * L, c42)
    simd.store(buf, 19 * L, c43)
    simd.store(buf, 20 * L, c50)
    simd.store(buf, 21 * L, c51)
    simd.store(buf, 22 * L, c52)
    simd.store(buf, 23 * L, c53)


@inline
def _kernel_narrow(buf, A, rows, a_step, P, p_off, k_count):
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
    simd.store(buf, 0 * NR, c00)
    simd.store(buf, 0 * NR + L, c01)
    simd.store(buf, 1 * NR, c10)
    simd.store(buf, 1 * NR + L, c11)
    simd.store(buf, 2 * NR, c20)
    simd.store(buf, 2 * NR + L, c21)
    simd.store(buf, 3 * NR, c30)
    simd.store(buf, 3 * NR + L, c31)
    simd.store(buf, 4 * NR, c40)
    simd.store(buf, 4 * NR + L, c41)
    simd.store(buf, 5 * NR, c50)
    simd.store(buf, 5 * NR + L, c51)


@inline
def _narrow_last_panel(n_cols, NR, L, panel_hi):
    # Whether the layer's last panel (index panel_hi - 1, if this task has it) has at most 2 vectors of columns.
    n_panels = (n_cols + NR - 1) // NR
    return panel_hi == n_panels and n_cols - (n_panels - 1) * NR <= 2 * L


@inline
def _rows_4(first, n_rows, row_step, shift):
    # Offsets in A of the 4 tile rows from row ``first``: row r at r * row_step + shift. Rows past n_rows repeat
    # the last one (their results are never stored).
    last = n_rows - 1
    return (min(first, last) * row_step + shift, min(first + 1, last) * row_step + shift,
            min(first + 2, last) * row_step + shift, min(first + 3, last) * row_step + shift)


@inline
def _rows_6(first, n_rows, row_step, shift):
    last = n_rows - 1
    return (min(first, last) * row_step + shift, min(first + 1, last) * row_step + shift,
            min(first + 2, last) * row_step + shift, min(first + 3, last) * row_step + shift,
            min(first + 4, last) * row_step + shift, min(first + 5, last) * row_step + shift)


# --- the epilogue ------------------------------------------------------------------------------------------------
@inline
def _epilogue(kind, act, value, operand, like):
    """The kind's epilogue on one vector of a finished product: FORWARD: value + operand (the bias), then relu /
    leaky relu (sigmoid and tanh come after the store: _activate_row); INPUT_GRAD: value * act'(operand), operand
    the previous layer's stored output; WEIGHT_GRAD: value as computed. ``like`` gives the element type. Written
    once for the tiles' epilogue (_finish) and the plain product's (_plain_product), so that both give the same
    numbers."""
    zero = simd.zero(like)
    one = simd.broadcast(like.dtype.type(1.0))
    slope = simd.broadcast(like.dtype.type(LEAKY_RELU_SLOPE))
    if kind == FORWARD:
        value = simd.add(value, operand)
        if act == RELU:
            value = simd.max(value, zero)
        elif act == LEAKY_RELU:
            value = simd.select_gt(value, zero, value, simd.mul(slope, value))
    elif kind == INPUT_GRAD:
        if act == RELU:
            value = simd.select_gt(operand, zero, value, zero)
        elif act == LEAKY_RELU:
            value = simd.select_gt(operand, zero, value, simd.mul(value, slope))
        elif act == SIGMOID:
            value = simd.mul(value, simd.mul(operand, simd.sub(one, operand)))
        elif act == TANH:
            value = simd.mul(value, simd.sub(one, simd.mul(operand, operand)))
    return value


@inline
def _finish(kind, act, out, row0, n_rows, col, n_cols, buf, tile_rows, bias, y):
    """A finished tile, read back from ``buf`` (row t's vector v at (t * TILE_VECTORS + v) * lanes), to out's rows
    row0 .. min(row0 + tile_rows, n_rows) and columns col .. n_cols (the last vector masked; rows past n_rows
    repeated a valid row of A and are not stored), through _epilogue: FORWARD + bias[col:] (sigmoid / tanh by
    _activate_row on the stored row), INPUT_GRAD * act'(y), y laid out like out, WEIGHT_GRAD as computed."""
    L = simd.lanes(out)
    ld_out = _leading(out)
    ld_y = _leading(y)
    zero = simd.zero(out)
    width = min(TILE_VECTORS * L, n_cols - col)
    for t in range(min(tile_rows, n_rows - row0)):
        row = row0 + t
        for v in range((width + L - 1) // L):
            c = col + v * L
            count = min(L, n_cols - c)
            full = count == L
            if kind == FORWARD:
                operand = simd.load(bias, c) if full else simd.load_partial(bias, c, count)
            elif kind == INPUT_GRAD:
                y_at = row * ld_y + c
                operand = simd.load(y, y_at) if full else simd.load_partial(y, y_at, count)
            else:
                operand = zero
            value = _epilogue(kind, act, simd.load(buf, (t * TILE_VECTORS + v) * L), operand, out)
            if full:
                simd.store(out, row * ld_out + c, value)
            else:
                simd.store_partial(out, row * ld_out + c, value, count)
        if kind == FORWARD and (act == SIGMOID or act == TANH):
            _activate_row(out, row, col, width, act)


@engine_jit(no_cpython_wrapper=True)  # linked by _task, called by symbol by _plain_product (activate_row)
def _activate_row(out, row, col, count, act):
    """sigmoid / tanh on out[row, col:col + count], just stored and still in L1: pointwise.activate's two
    branches, called directly, as scalar code (sigmoid's exp is plain arithmetic that LLVM vectorises over the
    loop; tanh is libm's). A compiled function of its own, called once per tile row."""
    if act == SIGMOID:
        for j in range(col, col + count):
            out[row, j] = sigmoid(out[row, j])
    elif act == TANH:
        for j in range(col, col + count):
            out[row, j] = math.tanh(out[row, j])


def _activate_row_signature(f):
    return (types.Array(f, 2, "C"), types.int64, types.int64, types.int64, types.int64)


# The drivers' product (its plain product) calls _activate_row by symbol, and only for sigmoid and tanh layers: a
# slot filled on request (see _jit, "Slots filled on request"), which the CPU backend fills for the networks that
# have such layers (activations_on_request). Linked into the product, as before, it was compiled in every cold
# first call (0.35-0.45 s of the product's 1.6 s, on the critical path of a first predict, AMD EPYC Zen 4), relu
# networks included. The tiles (_task) link the same function (numba compiles it once per signature), and
# tests/test_gemm.py compares the plain product with the tiles bit for bit, sigmoid and tanh included.
activate_row = _jit.SeparatelyCompiled(_activate_row, _activate_row_signature, on_request=True)


def activations_on_request(act_codes) -> list:
    """The functions filled on request that the drivers' products call for layers of these activation codes."""
    return [activate_row] if any(int(code) in (SIGMOID, TANH) for code in act_codes) else []


# The shape's functions, chosen once here (numba then compiles only that shape).
_kernel = _kernel_6x4 if WIDE else _kernel_4x3
_rows = _rows_6 if WIDE else _rows_4
# Vectors in a task's tile slot: the larger of the two kernel shapes (a module-level int: stack_vectors needs a
# compile-time constant).
TILE_SLOT_VECTORS = max(TILE_ROWS, NARROW_ROWS) * TILE_VECTORS


@inline
def _pack_rows(panels, base, B, n_rows, n_cols, panel_lo, panel_hi, sums, with_sums):
    """Panels panel_lo..panel_hi of B (n_rows x n_cols, rows contiguous) into panels[base:]: panel p's row k is
    B[k, p*NR : p*NR + NR] at base + (p * n_rows + k) * NR, zero-padded past n_cols. With ``with_sums``,
    sums[j] = B[:, j].sum() for the panels' columns, added in row order (the bias gradient: deterministic);
    ``sums`` (n_cols,) is not touched otherwise (a run-time flag, not a None: one compiled packer).
    k outermost, so B is read row by row, contiguously (0.76 ms for a 1024 x 1024 float32 W on a Zen 3 core,
    against 1.05 with panels outermost)."""
    L = simd.lanes(panels)
    NR = TILE_VECTORS * L
    ld_b = _leading(B)
    zero = simd.zero(panels)
    full_hi = min(panel_hi, n_cols // NR)  # panels before full_hi have all NR columns
    if with_sums:
        for j in range(panel_lo * NR, min(panel_hi * NR, n_cols)):
            sums[j] = 0
    for k in range(n_rows):
        for p in range(panel_lo, full_hi):
            src = k * ld_b + p * NR
            dst = base + (p * n_rows + k) * NR
            for v in range(TILE_VECTORS):
                x = simd.load(B, src + v * L)
                simd.store(panels, dst + v * L, x)
                if with_sums:
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
                if with_sums:
                    j = p * NR + v * L
                    if count >= L:
                        simd.store(sums, j, simd.add(simd.load(sums, j), x))
                    elif count > 0:
                        simd.store_partial(sums, j, simd.add(simd.load_partial(sums, j, count), x), count)


@inline
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


@inline
def _pack_broadcast_panels(panels, base, inp, n_rows, n_cols, group_lo, group_hi):
    """The weight gradient's A = inp^T in TILE_ROWS-wide panels: group q's element (k, t) is inp[k,
    q*TILE_ROWS + t] (0 past n_cols) at base + (q * n_rows + k) * TILE_ROWS. The micro-kernel then broadcasts
    TILE_ROWS consecutive numbers per k, instead of touching a new row of inp per k (a new page for a 1024-wide
    layer).

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
            src = k * ld_inp
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


@engine_jit()
def _pack(kind, panels, a, b, sums, depth, n_rows, n_cols, span):
    """The parts of a product's operands a task packs: panels span[0]..span[1] of B into panels[0:] (the weight
    for FORWARD, dout with its column sums into ``sums`` for WEIGHT_GRAD, the weight transposed for INPUT_GRAD),
    and groups span[2]..span[3] of inp^T after them (WEIGHT_GRAD with A packed). One compiled function: the
    three packers inlined once each (as separate functions they cost a cold compile 0.4-0.5 s more)."""
    panel_lo, panel_hi, group_lo, group_hi = span
    zero = depth - depth
    if kind == INPUT_GRAD:
        _pack_columns(panels, zero, b, n_cols, depth, panel_lo, panel_hi)
    else:
        _pack_rows(panels, zero, b, depth, n_cols, panel_lo, panel_hi, sums, kind == WEIGHT_GRAD)
    if group_hi > group_lo:
        NR = TILE_VECTORS * simd.lanes(panels)
        _pack_broadcast_panels(panels, depth * ((n_cols + NR - 1) // NR) * NR, a, depth, n_rows, group_lo, group_hi)


@engine_jit(no_cpython_wrapper=True)  # called by symbol: see _jit.SeparatelyCompiled
def _task(kind, act, out, a, b, vec, y, panels, span):
    """One task of a product (see the module notes): packs the parts of the operands only this task reads, then
    runs its rectangle of tiles with the kind's epilogue.

    out (n_rows, n_cols) the product's output; a, b the operands as the caller holds them (FORWARD: inp (B,
    n_in), weight (n_in, n_out); WEIGHT_GRAD: inp (B, n_in), dout (B, n_out); INPUT_GRAD: dout (B, n_out),
    weight (n_in, n_out)); vec the bias (FORWARD) or the bias gradient (WEIGHT_GRAD, written by the packing of
    dout); y (B, n_in) the previous layer's output (INPUT_GRAD). span: (tile_lo, tile_hi, panel_lo, panel_hi,
    pack_lo, pack_hi, a_pack_lo, a_pack_hi, a_packed): the task's row tiles and panels, the panels of B and the
    groups of inp^T it packs, and whether the weight gradient reads inp^T packed (see _product_shape)."""
    tile_lo, tile_hi, panel_lo, panel_hi, pack_lo, pack_hi, a_pack_lo, a_pack_hi, a_packed = span
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    L = simd.lanes(out)
    NR = TILE_VECTORS * L
    depth = _depth(kind, b)
    _pack(kind, panels, a, b, vec, depth, n_rows, n_cols, (pack_lo, pack_hi, a_pack_lo, a_pack_hi))
    # A's tile row r is at r * row_step + shift in A, its element k a_step further per k: rows of A as stored
    # (forward, input gradient), columns of inp as stored or inp^T's packed groups (weight gradient). One 2-D
    # array either way, so that the micro-kernel has one call site.
    a_base = depth * ((n_cols + NR - 1) // NR) * NR
    if a_packed:
        n_groups = (n_rows + TILE_ROWS - 1) // TILE_ROWS
        A = simd.matrix(panels, a_base, n_groups * depth, TILE_ROWS)
        row_step = 1
        a_step = TILE_ROWS
    elif kind == WEIGHT_GRAD:
        A = a
        row_step = 1
        a_step = _leading(a)
    else:
        A = a
        row_step = _leading(a)
        a_step = 1
    buf = simd.stack_vectors(out, TILE_SLOT_VECTORS)
    panel_group = _panel_group(depth, NR, out.itemsize)
    narrow = (not a_packed) and _narrow_last_panel(n_cols, NR, L, panel_hi)
    wide_hi = panel_hi - 1 if narrow else panel_hi
    row_end = min(tile_hi * TILE_ROWS, n_rows)  # this task's rows only
    # Sweeps of panel_group panels over the task's tiles, then the narrow last panel (if this task has it) as a
    # sweep of its own with NARROW_ROWS-row tiles. One loop nest, so that the epilogue (_finish, the larger
    # part of this function's cold compile) is inlined at one call site, not two (see the commit).
    n_wide_sweeps = (wide_hi - panel_lo + panel_group - 1) // panel_group if wide_hi > panel_lo else 0
    n_sweeps = n_wide_sweeps + (1 if narrow and wide_hi >= panel_lo else 0)
    for sweep in range(n_sweeps):
        narrow_sweep = sweep == n_wide_sweeps
        first = wide_hi if narrow_sweep else panel_lo + sweep * panel_group
        last = wide_hi + 1 if narrow_sweep else min(first + panel_group, wide_hi)
        tile_rows = _runtime(NARROW_ROWS) if narrow_sweep else _runtime(TILE_ROWS)
        for row0 in range(tile_lo * TILE_ROWS, row_end, tile_rows):
            # Both kernels' row offsets (tuples of different lengths with AVX2's 4-row tiles): a few integer
            # operations a tile row. Packed groups: group q (q * TILE_ROWS = row0) starts at row0 * depth.
            rows = _rows(row0, n_rows, row_step, row0 * (depth - 1) if a_packed else 0)
            narrow_rows = _rows_6(row0, row_end, row_step, 0)
            for p in range(first, last):
                if narrow_sweep:
                    _kernel_narrow(buf, A, narrow_rows, a_step, panels, p * depth * NR, depth)
                else:
                    _kernel(buf, A, rows, a_step, panels, p * depth * NR, depth)
                _finish(kind, act, out, row0, row_end, p * NR, n_cols, buf, tile_rows, vec, y)


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


# --- the drivers' product until the worker is compiled -------------------------------------------------------------
# Multiply-adds of plain products after which the tiled worker pays for its compile (about 3.4 s of one core, AMD
# EPYC Zen 4): the plain product took 15-65 ps more per multiply-add than the tiles there (a 32-64-64-5 epoch of
# 4096 rows 4.4 against 3.2 ms; 784-256-256-10, 8192 rows: 490 against 65 ms), so this many cost 0.5-2.2 s more.
# Without a helper process the worker is compiled once a process's plain products add up to it (see
# _jit.SeparatelyCompiled's wanted_after); a backend waits for the worker before a call of as many
# (fastbp.backends.cpu).
TILES_PAY_AFTER = 1 << 35


@inline
def _plain_product(kind, act, out, a, b, vec, y, panels):
    """The product ``kind`` (see _task for the operands) without packing or register tiles: what the drivers'
    product runs until the worker (_task) is in its slot (see ``product`` below). The SAME numbers as _task: every
    output is the same chain of fmas over k in order from zero, the bias gradient the same vector sums of dout's
    rows in order, then the same epilogue (_epilogue) and, for sigmoid and tanh, the same _activate_row calls on
    the same NR-wide stretches of a row (by symbol: activate_row). One row x one vector at a time, every load of B
    masked to the layer's columns; the input gradient's B (weight^T) is first written out into ``panels`` row by
    row. Four rows at a time (four accumulators) ran faster but cost 0.25 s more to compile (AMD EPYC Zen 4): this
    is the part of a cold first call's compile that its products need, the tiles come later."""
    L = simd.lanes(out)
    NR = TILE_VECTORS * L
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    ld_out = _leading(out)
    ld_y = _leading(y)
    zero = simd.zero(out)
    depth = _depth(kind, b)
    if kind == INPUT_GRAD:
        for j in range(n_cols):
            for k in range(depth):
                panels[k * n_cols + j] = b[j, k]
        B = simd.matrix(panels, 0, depth, n_cols)
    else:
        B = b
    ld_b = _leading(B)
    if kind == WEIGHT_GRAD:
        # The bias gradient: dout's column sums, row after row, each partial sum stored, as _pack_rows adds them.
        # Not summed in a register: LLVM's machine combiner then reassociates the chain of adds (the functions'
        # fast-math attributes allow it), and the sums differed from the tiles' in the last bit.
        for c in range(0, n_cols, L):
            count = min(L, n_cols - c)
            simd.store_partial(vec, c, zero, count)
            for k in range(depth):
                simd.store_partial(vec, c, simd.add(simd.load_partial(vec, c, count),
                                                    simd.load_partial(B, k * ld_b + c, count)), count)
    # A's row r at r * row_step, its element k a_step further: inp or dout as stored, inp^T for the weight gradient
    row_step = 1 if kind == WEIGHT_GRAD else _leading(a)
    a_step = _leading(a) if kind == WEIGHT_GRAD else 1
    for row in range(n_rows):
        for c in range(0, n_cols, L):
            count = min(L, n_cols - c)
            total = zero
            a_at = row * row_step
            b_at = c
            for _ in range(depth):
                total = simd.fma(simd.broadcast_load(a, a_at), simd.load_partial(B, b_at, count), total)
                a_at += a_step
                b_at += ld_b
            if kind == FORWARD:
                operand = simd.load_partial(vec, c, count)
            elif kind == INPUT_GRAD:
                operand = simd.load_partial(y, row * ld_y + c, count)
            else:
                operand = zero
            simd.store_partial(out, row * ld_out + c, _epilogue(kind, act, total, operand, out), count)
        if kind == FORWARD and (act == SIGMOID or act == TANH):
            for col in range(0, n_cols, NR):
                activate_row(out, row, col, min(NR, n_cols - col), act)


@inline
def _product_shape(kind, out, b):
    # (depth, n_tiles, n_panels, a_packed) of the product ``kind`` into ``out`` (see _task for the operands).
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    depth = _depth(kind, b)
    NR = TILE_VECTORS * simd.lanes(out)
    n_panels = (n_cols + NR - 1) // NR
    n_tiles = (n_rows + TILE_ROWS - 1) // TILE_ROWS
    # The weight gradient reads inp^T packed (TILE_ROWS numbers per k, contiguous) when there are many panels of
    # dout to reuse it and inp's rows are a page or more apart or the batch is long; else tile row t broadcasts
    # inp[k, row0 + t] as stored. Zen 3 core, float32, one thread, ms packed / as stored: 512 x 1024 -> 1024
    # 15.3 / 21.2 (rows 4 KiB apart: one L1 set, 128 lines of L2), 128 x 1024 -> 1024 4.3 / 5.4, 512 x 256 ->
    # 256 1.14 / 1.18, 128 x 784 -> 256 0.83 / 0.79, 128 x 256 -> 256 0.27 / 0.26; 512 x 1024 -> 10 (one panel)
    # 0.36x OpenBLAS packed, 1.1x as stored.
    a_packed = kind == WEIGHT_GRAD and n_panels > 2 and (depth > PACK_BROADCAST_MIN_BATCH
                                                        or n_rows * out.itemsize >= 4096)
    return depth, n_tiles, n_panels, a_packed


@inline
def _plain_first(kind, out):
    # Whether the plain product computes this product (before any tile): an empty output (nothing to do), or a
    # forward of fewer rows than a tile. Packing the weight would cost as much as the product there, and a tile
    # computes TILE_ROWS rows for one (a one-row prediction of a 64-128-10 network through Trainer.predict: 9.6 us
    # with the simple loops this replaced, 20 us on the tiles, AMD EPYC Zen 4; the plain product ran the
    # dev.side_by_side one-row predict 1.04x faster than those loops). The same numbers as the tiles: a row
    # predicted alone is predicted as in a batch.
    return out.shape[0] == 0 or out.shape[1] == 0 or (kind == FORWARD and out.shape[0] < TILE_ROWS)


@inline
def _multiply_adds(kind, out, b):
    # The product's multiply-adds: out's rows x columns x the depth (see _task for the operands).
    return out.shape[0] * out.shape[1] * _depth(kind, b)


@inline
def _parallel_work(multiply_adds):
    # Whether a product of this many multiply-adds is worth a parallel region: PARALLEL_MIN_WORK or more.
    return multiply_adds >= PARALLEL_MIN_WORK


@inline
def _run_serial(kind, act, out, a, b, vec, y, panels):
    # The product as one task on the calling thread (the worker, called by symbol).
    depth, n_tiles, n_panels, a_packed = _product_shape(kind, out, b)
    zero = n_tiles - n_tiles
    n_a_tiles = n_tiles if a_packed else zero
    task_by_symbol(kind, act, out, a, b, vec, y, panels,
                   (zero, n_tiles, zero, n_panels, zero, n_panels, zero, n_a_tiles, zero + a_packed))


@inline
def _run_parallel(kind, act, out, a, b, vec, y, panels):
    # The product as one parallel region of numba.get_num_threads() tasks (one task on the calling thread where
    # that is 1), each a call of the worker by symbol.
    n_threads = _thread_count()
    if n_threads == 1:
        _run_serial(kind, act, out, a, b, vec, y, panels)
        return
    depth, n_tiles, n_panels, a_packed = _product_shape(kind, out, b)
    n_rows = out.shape[0]
    n_cols = out.shape[1]
    zero = n_rows - n_rows
    # A is (n_rows x depth), B (depth x n_cols) for every kind
    row_tasks, col_tasks = _task_grid(n_tiles, n_panels, n_threads, n_rows * depth, depth * n_cols)
    shared_b = row_tasks > 1  # tasks share B's panels: pack them all first, here (1/B of the product's work)
    shared_a = col_tasks > 1 and a_packed  # tasks share inp^T's groups
    if shared_b or shared_a:  # a task with no tiles: it only packs (the driver compiles no packer of its own)
        task_by_symbol(kind, act, out, a, b, vec, y, panels,
                       (zero, zero, zero, zero, zero, n_panels if shared_b else zero, zero,
                        n_tiles if shared_a else zero, zero + a_packed))
    for task in prange(row_tasks * col_tasks):
        r = task // col_tasks
        c = task % col_tasks
        tile_lo = r * n_tiles // row_tasks
        tile_hi = (r + 1) * n_tiles // row_tasks
        panel_lo = c * n_panels // col_tasks
        panel_hi = (c + 1) * n_panels // col_tasks
        a_hi = tile_lo if shared_a or not a_packed else tile_hi
        task_by_symbol(kind, act, out, a, b, vec, y, panels,
                       (tile_lo, tile_hi, panel_lo, panel_hi, panel_lo, panel_lo if shared_b else panel_hi, tile_lo,
                        a_hi, zero + a_packed))


def _task_signature(f):
    matrix = types.Array(f, 2, "C")
    vector = types.Array(f, 1, "C")
    return (types.int64, types.int64, matrix, matrix, matrix, vector, matrix, vector, types.UniTuple(types.int64, 9))


def _product_signature(f):
    matrix = types.Array(f, 2, "C")
    vector = types.Array(f, 1, "C")
    return (types.int64, types.int64, matrix, matrix, matrix, vector, matrix, vector)


# The product, compiled once per dtype: every caller (fastbp.kernels.cpu's drivers and its vocabulary kernels,
# dense_forward ...) calls ``product`` by symbol, which calls the worker (_task) by symbol too (see
# _jit.SeparatelyCompiled): the worker is optimised and code-generated once, not again in each caller and in the
# outlined parallel body (a cold first fit, AMD EPYC Zen 4, loaded machine, alternating runs: 22.8 -> 19.6 s).
# The vocabulary kernels used to link a second version of the product (the worker linked into itself and into
# its parallel body, 8.5 s cold per dtype, and again into each kernel that linked it: 2-4 s each): a user's njit
# function calling dense_forward and dense_backward compiled in 14.4-14.6 s cold and 1.33-1.39 s with fastbp's
# cache warm, 10.4-11.1 s and 0.61 s by symbol (AMD EPYC Zen 4, 2026-12-07). A user's cached function finds
# the slots filled in a new process through numba's reload_init (_jit._FillOnLoad).
#
# ``product``'s parallel region is a separately compiled function of its own, ``parallel_tasks``, and an optional
# one (_jit.SeparatelyCompiled's optional=True): until its slot is filled, ``product`` runs every product as one
# task on the calling thread, which gives the same numbers (every output is summed by the same micro-kernel in
# the same order whatever the split). numba outlines a prange's body into a function it compiles with the
# parfor passes: about 1 s of every cold first fit and predict in this process (_product_by_symbol 1.4-2.0 s,
# AMD EPYC Zen 4), though a small network's products never reach PARALLEL_MIN_WORK. The compile helper compiles
# it last instead, and a process picks it up from the disk cache at a later call; without a helper, a process
# compiles it at the first call after a product wanted it (see _jit, "Optional slots"). Outside the drivers'
# compile sessions (a vocabulary kernel, a user's function), compiling the product fills both optional slots.
task_by_symbol = _jit.SeparatelyCompiled(_task, _task_signature, optional=True, wanted_after=TILES_PAY_AFTER)


@engine_jit(parallel=True, no_cpython_wrapper=True)  # called by symbol: see _jit.SeparatelyCompiled
def _parallel_tasks(kind, act, out, a, b, vec, y, panels):
    """``product``'s parallel region: the product as numba.get_num_threads() tasks called by symbol."""
    _run_parallel(kind, act, out, a, b, vec, y, panels)


parallel_tasks = _jit.SeparatelyCompiled(_parallel_tasks, _product_signature, optional=True)


@engine_jit(no_cpython_wrapper=True)  # called by symbol: see _jit.SeparatelyCompiled
def _product_by_symbol(kind, act, out, a, b, vec, y, panels):
    """The product ``kind`` (see _task for the operands), its tasks called by symbol: in parallel once
    ``parallel_tasks`` is compiled in this process, on the calling thread until then; the plain product until the
    tiled worker (``task_by_symbol``) is, and for a forward of fewer rows than a tile."""
    work = _multiply_adds(kind, out, b)
    if _plain_first(kind, out) or not _jit.is_compiled(task_by_symbol, out, work):
        _plain_product(kind, act, out, a, b, vec, y, panels)
    elif _parallel_work(work) and _jit.is_compiled(parallel_tasks, out, 1):
        parallel_tasks(kind, act, out, a, b, vec, y, panels)
    else:
        _run_serial(kind, act, out, a, b, vec, y, panels)


product = _jit.SeparatelyCompiled(_product_by_symbol, _product_signature)


@inline
def fill_tiles(like):
    # For callers of ``product`` outside the drivers (the vocabulary kernels, and through them a user's numba code):
    # the tiled worker and the parallel region in their slots, for the dtype of the array ``like``, wherever the
    # caller runs (_jit.fill_on_use), not only after a later driver call (see _jit, "Optional slots").
    _jit.fill_on_use(task_by_symbol, like)
    _jit.fill_on_use(parallel_tasks, like)
