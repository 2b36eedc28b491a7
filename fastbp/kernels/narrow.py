"""A fused CPU training kernel for narrow networks: one loop nest per block of samples through all layers.

For a network whose layers are all a few dozen units wide or less (W1: 1-16-1), a training step is a few
microseconds of arithmetic, and the general path (``fastbp.kernels.cpu.train_epochs``) spends most of it
between kernels: 14 compiled calls an epoch for W1, each with its own loop set-up, three transposes and a
separate pass per activation. Here one compiled call runs all epochs, and inside a step every block of
``LANES`` samples (lanes = samples, one 64-byte vector) goes forward through every layer, through the loss
and back again in one loop nest. The block's activations and deltas live in a small workspace that stays
in L1 (one 64-byte row per unit), weight gradients are summed per lane across the step's blocks and reduced
over the lanes once per step, and the optimizer runs once per step. Serial: a W1 step is about a
microsecond, less than the start of a parallel region; results do not depend on the thread count.

Lane vectors. The block arithmetic is written on explicit vectors (``simd.SimdVector``, the engine's one vector
type, here always 64 bytes: an LLVM ``<16 x float>`` or ``<8 x double>``, with simd's operators, emitted with
simd.OPERATOR_FLAGS only), not as loops over lanes: a plain ``for lane in range(16)`` inside the loop over a
layer's inputs k is fully unrolled by LLVM, which then vectorises the loop over k instead, as 16 strided
reductions with horizontal sums at the end (seen in inspect_asm while this module was written). LLVM's loop
vectoriser leaves values of a vector type alone; they stay in registers and give packed FMAs on every x86-64 CPU
(two ymm per vector with AVX2, one zmm with AVX-512). The operations accept plain scalars too, so the math below
has one source for both.

Math. exp builds 2^n from the exponent bits (n + bias shifted into the exponent field, bitcast to a float)
instead of ``pointwise.exp_fast``'s integer shifts, squarings and division, with minimax polynomials of
degree 6 (float32) and 11 (float64) where exp_fast uses Taylor's 8 and 14 terms; log (softmax
cross-entropy), log1p (binary cross-entropy) and tanh are vectorised the same way, so nothing calls libm
per sample.

Specialisation. ``kernel_for(act_codes, loss)`` compiles one kernel per set of activations and loss (a closure
over those integer codes: numba folds the other branches away before typing them, and caches one entry per
configuration); networks without sigmoid or tanh layers share the relu-and-leaky_relu kernel of their loss.
The optimizer code and the layer widths are run-time values.

Public: ``train_epochs_narrow`` (the contract of ``cpu.train_epochs``, see its docstring), ``kernel_for``,
``workspace_length``, ``make_workspace``, ``supports``, the lane-vector math (``exp_bits`` ...), and the
serial reference ``train_epochs_naive``.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import SeparatelyCompiled, cpu_jit, inline, prefer_wide_vectors, read_only
from .simd import OPERATOR_FLAGS, SimdMask, SimdVector, as_operand, operand_type, splat
from . import cpu, simd
from .pointwise import (
    ACTIVATION_NAMES,
    BINARY_CROSS_ENTROPY,
    LEAKY_RELU,
    LEAKY_RELU_SLOPE,
    LOSS_NAMES,
    MSE,
    POISSON,
    RELU,
    SIGMOID,
    TANH,
    activate,
    activation_grad,
    loss_divisor,
    loss_grad_row,
)

# Samples per block: one 64-byte vector of each dtype (a zmm register with AVX-512, two ymm with AVX2).
LANES = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}
_LANES_NB = {types.float32: 16, types.float64: 8}
# The widest layer (input and output included) for which the CPU backend chooses this path; see supports() for
# the measurements. The kernel itself takes any widths (the tests run it on 128-wide layers).
NARROW_MAX_WIDTH = 32
# The scalar code around the vectors compiles with every CPU kernel's freedoms (fastbp._jit.FAST).
FAST = cpu.FAST


# --- lane vectors: simd.SimdVector of LANES numbers, whatever the CPU's own vector width ----------------------
def _lane_vector_of(dtype):
    return SimdVector(dtype, _LANES_NB[dtype])


def _element(ty):
    return ty.dtype if isinstance(ty, SimdVector) else ty


def _llvm_intrinsic(builder, name, ty, args, context):
    """Call llvm.<name> overloaded on ty (a float or a SimdVector). Declared by name: llvmlite 0.50 cannot
    derive the name suffix of a vector type (see the shared cpu-engine notes)."""
    lty = context.get_value_type(ty)
    suffix = f"f{_element(ty).bitwidth}"
    if isinstance(ty, SimdVector):
        suffix = f"v{ty.lanes}{suffix}"
    fnty = ir.FunctionType(lty, [lty] * len(args))
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.{suffix}")
    return builder.call(fn, args)


def _int_types(ty):
    """(integer type as wide as ty's float elements, its element, the int32 type of ty's shape)."""
    element = ir.IntType(_element(ty).bitwidth)
    if isinstance(ty, SimdVector):
        return ir.VectorType(element, ty.lanes), element, ir.VectorType(ir.IntType(32), ty.lanes)
    return element, element, ir.IntType(32)


def _int_constant(ity, element, value):
    if isinstance(ity, ir.VectorType):
        return ir.Constant(ity, [ir.Constant(element, value)] * ity.count)
    return ir.Constant(ity, value)


# --- lane vectors: functions (each also accepts plain floats) ------------------------------------------------
@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma)."""
    result = operand_type(a, b, c)
    if result is None:
        return None

    def codegen(context, builder, sig, args):
        ops = [as_operand(context, builder, v, t, result) for v, t in zip(args, sig.args)]
        return _llvm_intrinsic(builder, "fma", result, ops, context)

    return result(a, b, c), codegen


@intrinsic
def vabs(typingctx, a):
    """|a| (clears the sign bit)."""
    if operand_type(a) is None:
        return None

    def codegen(context, builder, sig, args):
        return _llvm_intrinsic(builder, "fabs", sig.return_type, [args[0]], context)

    return a(a), codegen


@intrinsic
def vround(typingctx, a):
    """a rounded to the nearest integer, ties to even, as a float: llvm.roundeven, one instruction
    (vroundps/vroundpd $8 on x86, cvt.rni on PTX) where floor(x + 0.5) takes two."""
    if operand_type(a) is None:
        return None

    def codegen(context, builder, sig, args):
        return _llvm_intrinsic(builder, "roundeven", sig.return_type, [args[0]], context)

    return a(a), codegen


@intrinsic
def vselect(typingctx, mask, a, b):
    """Lane by lane ``a if mask else b`` (a blend: both sides are computed). Two scalars blended by a lane
    mask give a lane vector."""
    result = operand_type(a, b)
    if result is None:
        return None
    if isinstance(mask, SimdMask) and not isinstance(result, SimdVector):
        result = SimdVector(result, mask.lanes)
    if isinstance(result, SimdVector) != isinstance(mask, SimdMask):
        return None

    def codegen(context, builder, sig, args):
        x = as_operand(context, builder, args[1], sig.args[1], result)
        y = as_operand(context, builder, args[2], sig.args[2], result)
        return builder.select(args[0], x, y)

    return result(mask, a, b), codegen


@inline
def vmax(a, b):
    """``a if a > b else b`` lane by lane (as Python's max of two floats: a NaN in a gives b)."""
    return vselect(a > b, a, b)


@intrinsic
def elem(typingctx, like, value):
    """``value`` as a scalar of like's element type (like: a float, a SimdVector or an array): the
    dtype-generic constant, ``type(x)(0.5)`` that works for lane vectors too."""
    element = like.dtype if isinstance(like, (types.Array, SimdVector)) else like
    if not isinstance(element, types.Float) or not isinstance(value, types.Number):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[1], sig.args[1], element)

    return element(like, value), codegen


@intrinsic
def vfill(typingctx, like, value):
    """value in like's type: a lane vector of value for a lane vector, a scalar for a float."""
    if operand_type(like) is None or not isinstance(value, types.Number):
        return None

    def codegen(context, builder, sig, args):
        return as_operand(context, builder, args[1], sig.args[1], like)

    return like(like, value), codegen


@intrinsic
def is_single(typingctx, like):
    """Whether like's element type is float32: a constant, so branches on it fold at compile time."""
    element = like.dtype if isinstance(like, (types.Array, SimdVector)) else like
    single = element == types.float32

    def codegen(context, builder, sig, args):
        return context.get_constant(types.boolean, single)

    return types.boolean(like), codegen


@intrinsic
def lane_count(typingctx, arr):
    """The lanes of arr's dtype (16 for float32, 8 for float64), a compile-time constant."""
    if not isinstance(arr, types.Array) or arr.dtype not in _LANES_NB:
        return None
    count = _LANES_NB[arr.dtype]

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, count)

    return types.intp(arr), codegen


def _is_flat(arr):
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"


def _element_pointer(context, builder, arr_ty, arr, index_ty, index):
    ary = context.make_array(arr_ty)(context, builder, arr)
    return builder.gep(ary.data, [context.cast(builder, index, index_ty, types.intp)])


@intrinsic
def vload(typingctx, arr, offset):
    """The lane vector arr[offset:offset + lanes] of a 1-D C-contiguous float array. No bounds check."""
    if not (_is_flat(arr) and arr.dtype in _LANES_NB):
        return None
    vt = _lane_vector_of(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        vptr = builder.bitcast(ptr, context.get_value_type(vt).as_pointer())
        return builder.load(vptr, align=arr.dtype.bitwidth // 8)

    return vt(arr, offset), codegen


@intrinsic
def vstore(typingctx, arr, offset, value):
    """arr[offset:offset + lanes] = value (a lane vector of arr's dtype). No bounds check."""
    if not (_is_flat(arr) and arr.dtype in _LANES_NB) or value != _lane_vector_of(arr.dtype):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def sload(typingctx, arr, index):
    """arr[index] of a 1-D C-contiguous array without numba's negative-index wrap-around (a select on every
    access when numba cannot prove the index non-negative) and without a bounds check."""
    if not _is_flat(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]))

    return arr.dtype(arr, index), codegen


@intrinsic
def sstore(typingctx, arr, index, value):
    """arr[index] = value (cast to arr's dtype), as sload: no wrap-around, no bounds check."""
    if not _is_flat(arr) or not isinstance(index, types.Integer) or not isinstance(value, types.Number):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(context.cast(builder, args[2], sig.args[2], arr.dtype), ptr)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vsplat(typingctx, value, like):
    """A lane vector of like's dtype (like: an array) with value in every lane."""
    if not (isinstance(like, types.Array) and like.dtype in _LANES_NB and isinstance(value, types.Number)):
        return None
    vt = _lane_vector_of(like.dtype)

    def codegen(context, builder, sig, args):
        return as_operand(context, builder, args[0], sig.args[0], vt)

    return vt(value, like), codegen


def _gather_codegen(context, builder, sig, args, ordered):
    # lane l = flat[row(l) * stride + column], row(l) = first + l (or order[first + l]) for l < valid, the row
    # of lane 0 for the lanes after: one scalar load and insertelement per lane, no loop, no branch.
    if ordered:
        flat, order, first, valid, stride, column = args
        flat_ty, order_ty = sig.args[0], sig.args[1]
        order_data = context.make_array(order_ty)(context, builder, order).data
    else:
        flat, first, valid, stride, column = args
        flat_ty = sig.args[0]
    n_args = len(sig.args)
    first, valid, stride, column = (context.cast(builder, a, t, types.intp)
                                    for a, t in zip((first, valid, stride, column), sig.args[n_args - 4:]))
    data = context.make_array(flat_ty)(context, builder, flat).data
    vty = context.get_value_type(sig.return_type)
    intp = context.get_value_type(types.intp)
    vector = ir.Constant(vty, ir.Undefined)
    for lane in range(vty.count):
        inside = builder.icmp_signed("<", ir.Constant(intp, lane), valid)
        position = builder.select(inside, builder.add(first, ir.Constant(intp, lane)), first)
        row = builder.load(builder.gep(order_data, [position])) if ordered else position
        value = builder.load(builder.gep(data, [builder.add(builder.mul(row, stride), column)]))
        vector = builder.insert_element(vector, value, ir.Constant(ir.IntType(32), lane))
    return vector


@intrinsic
def vgather_rows(typingctx, flat, first, valid, stride, column):
    """The lane vector flat[(first + l) * stride + column] for lanes l < valid, lane 0's value after them:
    one column of rows first.. of a row-major (rows, stride) matrix given flat. No bounds check."""
    if not (_is_flat(flat) and flat.dtype in _LANES_NB):
        return None
    vt = _lane_vector_of(flat.dtype)

    def codegen(context, builder, sig, args):
        return _gather_codegen(context, builder, sig, args, False)

    return vt(flat, first, valid, stride, column), codegen


@intrinsic
def vgather_ordered(typingctx, flat, order, first, valid, stride, column):
    """vgather_rows with the rows looked up in order (1-D integers): row(l) = order[first + l]."""
    if not (_is_flat(flat) and flat.dtype in _LANES_NB and _is_flat(order)
            and isinstance(order.dtype, types.Integer)):
        return None
    vt = _lane_vector_of(flat.dtype)

    def codegen(context, builder, sig, args):
        return _gather_codegen(context, builder, sig, args, True)

    return vt(flat, order, first, valid, stride, column), codegen


@intrinsic
def vlanes_below(typingctx, count, like):
    """The mask ``lane < count`` for lane vectors of like's dtype (like: an array)."""
    if not (isinstance(like, types.Array) and like.dtype in _LANES_NB and isinstance(count, types.Integer)):
        return None
    n = _LANES_NB[like.dtype]

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        bound = splat(builder, ir.VectorType(i64, n), context.cast(builder, args[0], sig.args[0], types.int64))
        index = ir.Constant(ir.VectorType(i64, n), [ir.Constant(i64, i) for i in range(n)])
        return builder.icmp_signed("<", index, bound)

    return SimdMask(n)(count, like), codegen


@intrinsic
def vsum(typingctx, value):
    """The sum of a lane vector's lanes: a fixed tree of pairwise adds (halves, then quarters, ...), so the
    order, and the result, do not depend on the compiler or the CPU."""
    if not isinstance(value, SimdVector):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        i32 = ir.IntType(32)
        width = value.lanes
        while width > 1:
            half = width // 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, width))))
            v = builder.fadd(lo, hi, flags=OPERATOR_FLAGS)
            width = half
        return builder.extract_element(v, ir.Constant(i32, 0))

    return value.dtype(value), codegen


@intrinsic
def vpow2(typingctx, n):
    """2**n for integral n (a float or lane vector) in the normal exponent range (float32 -126..127, float64
    -1022..1023), exactly: n + bias shifted into the exponent field and bitcast to a float.

    The float-to-integer conversion goes through int32 (sign-extended for float64): AVX2 converts doubles
    only to int32 (vcvttpd2dq); double to int64 needs AVX-512DQ and would otherwise be scalarised."""
    if operand_type(n) is None:
        return None
    bias, mantissa = (127, 23) if _element(n) == types.float32 else (1023, 52)

    def codegen(context, builder, sig, args):
        ity, element, i32 = _int_types(n)
        k = builder.fptosi(args[0], i32)
        if element.width != 32:
            k = builder.sext(k, ity)
        bits = builder.shl(builder.add(k, _int_constant(ity, element, bias)),
                           _int_constant(ity, element, mantissa))
        return builder.bitcast(bits, context.get_value_type(sig.return_type))

    return n(n), codegen


@intrinsic
def vsplit_exponent(typingctx, x):
    """(m, e) with x = m * 2**e, m in [1, 2), e integral (as a float), for positive normal x (a float or lane
    vector): the exponent field shifted out; the mantissa bits given the exponent of 1.0."""
    if operand_type(x) is None:
        return None
    bias, mantissa = (127, 23) if _element(x) == types.float32 else (1023, 52)

    def codegen(context, builder, sig, args):
        ity, element, i32 = _int_types(x)
        fty = context.get_value_type(x)
        bits = builder.bitcast(args[0], ity)
        m_bits = builder.or_(builder.and_(bits, _int_constant(ity, element, (1 << mantissa) - 1)),
                             _int_constant(ity, element, bias << mantissa))
        biased = builder.lshr(bits, _int_constant(ity, element, mantissa))
        if element.width != 32:  # through int32: AVX2 converts int32 (not int64) lanes to doubles
            biased = builder.trunc(biased, i32)
        e = builder.sitofp(builder.sub(biased, _int_constant(i32, ir.IntType(32), bias)), fty)
        return context.make_tuple(builder, sig.return_type, [builder.bitcast(m_bits, fty), e])

    return types.UniTuple(x, 2)(x), codegen


# --- math on lane vectors (and scalars) ---------------------------------------------------------------------
# exp(r) = 1 + r + r^2 P(r) on |r| <= ln2/2: the coefficients of P minimise the maximum relative error of
# exp (a Lawson / iteratively reweighted least-squares fit in 40-digit mpmath arithmetic, done for this
# module): degree 4 for float32 (max relative error of the polynomial 3.1e-9, against float32's unit
# roundoff 6e-8; degree 3 would be 1.0e-7), degree 9 for float64 (3.6e-18; degree 8: 2.9e-16, two unit
# roundoffs). pointwise.exp_fast's Taylor polynomials use 8 and 14 terms for the same ranges.
_EXP_P32 = (0.4999999345147262598295, 0.1666652068756310720298, 0.04166838740854703726858,
            0.008368710035308249699593, 0.001381461100106316811319)
_EXP_P64 = (0.5000000000000010617569, 0.1666666666666641276289, 0.04166666666653025940433,
            0.008333333333494336188507, 0.00138888889435993150899, 0.0001984126950677966555818,
            0.00002480149313461758353864, 0.000002755758626230746903407, 2.763023444512102165238e-7,
            2.500007449710043150205e-8)
LOG2E = 1.4426950408889634
# Cody-Waite: ln 2 = LN2_HI + LN2_LO with LN2_HI exact in 9 bits, so n * LN2_HI is exact for |n| <= 2^15.
LN2_HI = 0.693359375
LN2_LO = -2.12194440054690582e-4
# exp's range: below EXP_LO_* the result would be below the smallest normal number (returned as 0), above
# EXP_HI_* above the largest finite number (inf). For float32 the constants are the float32 numbers at the
# ends (as float32, -87.33654475 = ln 2^-126 would round below it, and 88.72283906 = ln FLT_MAX above it,
# where exp overflows); for float64, ln 2^-1022 and ln DBL_MAX.
EXP_LO_32 = -87.33654
EXP_HI_32 = 88.72283
EXP_LO_64 = -708.3964185322641
EXP_HI_64 = 709.782712893384


@inline
def _exp_parts(x, nonpositive):
    # (q, s1, s2) with exp(x) = s1 s2 (1 + q), q = exp(r) - 1 from the polynomial, s1 s2 = 2^n. The special
    # cases ride on the powers of two, off the polynomial's dependency chain: s1 = 0 below the range (the
    # result is 0, or -1 for expm1), s1 = NaN for NaN, s2 = inf above it. nonpositive (a constant): x <= 0,
    # where n >= -126 (-1022) fits ONE power of two (s2 = 1); over the whole range n reaches 128 (1024),
    # split as 2^(n>>1) 2^(n - (n>>1)) (the same split as SLEEF's ldexp2k).
    if is_single(x):
        lo = elem(x, EXP_LO_32)
        hi = elem(x, EXP_HI_32)
    else:
        lo = elem(x, EXP_LO_64)
        hi = elem(x, EXP_HI_64)
    xc = vselect(x > lo, x, lo)  # NaN goes to lo (an ordered compare is false): the conversion never sees NaN
    if not nonpositive:
        xc = vselect(xc < hi, xc, hi)
    nf = vround(xc * elem(x, LOG2E))
    r = vfma(nf, elem(x, -LN2_HI), xc)
    r = vfma(nf, elem(x, -LN2_LO), r)
    r2 = r * r
    # Estrin's scheme: the polynomial in 3 (float32) or 4 (float64) dependent FMA levels instead of Horner's
    # 4 or 9; the sigmoid pass is bound by its dependency chain (measured: see bench_narrow's notes).
    if is_single(x):
        a = vfma(elem(x, _EXP_P32[1]), r, elem(x, _EXP_P32[0]))
        b = vfma(elem(x, _EXP_P32[3]), r, elem(x, _EXP_P32[2]))
        b = vfma(elem(x, _EXP_P32[4]), r2, b)
        p = vfma(b, r2, a)
    else:
        r4 = r2 * r2
        e0 = vfma(elem(x, _EXP_P64[1]), r, elem(x, _EXP_P64[0]))
        e1 = vfma(elem(x, _EXP_P64[3]), r, elem(x, _EXP_P64[2]))
        e2 = vfma(elem(x, _EXP_P64[5]), r, elem(x, _EXP_P64[4]))
        e3 = vfma(elem(x, _EXP_P64[7]), r, elem(x, _EXP_P64[6]))
        e4 = vfma(elem(x, _EXP_P64[9]), r, elem(x, _EXP_P64[8]))
        f0 = vfma(e1, r2, e0)
        f1 = vfma(e3, r2, e2)
        f1 = vfma(e4, r4, f1)
        p = vfma(f1, r4, f0)
    q = vfma(r2, p, r)
    special = vselect(x != x, x, elem(x, 0.0))
    if nonpositive:
        s1 = vselect(x >= lo, vpow2(nf), special)
        s2 = vfill(x, 1.0)
    else:
        half = vround(nf * elem(x, 0.5) - elem(x, 0.25))  # floor(n / 2) for integral n
        s1 = vselect(x >= lo, vpow2(half), special)
        s2 = vselect(x <= hi, vpow2(nf - half), elem(x, math.inf))
    return q, s1, s2


@inline
def exp_bits(x):
    """exp(x) for a float or a lane vector, from exponent bits: 2^n shifted into a float's exponent field.

    x = n ln2 + r (|r| <= ln2/2, Cody-Waite), exp(r) by a minimax polynomial, 2^n bitcast from n + bias.
    Max relative error (tests/test_narrow.py, dense grids over the whole range): about 1 ulp in float32
    and float64. 0 below the smallest normal result, inf above the largest finite one, NaN for NaN.
    Branch-free (selects only), so it vectorises; plain arithmetic, integer ops and one bitcast.
    """
    q, s1, s2 = _exp_parts(x, False)
    return vfma(s1, q, s1) * s2


@inline
def exp_nonpositive(x):
    """exp(x) for x <= 0 (as exp_bits, one power of two fewer): exp(-|z|) in sigmoid, z - max(z) in softmax.
    0 below the smallest normal result, NaN for NaN. Positive x is outside its contract."""
    q, s1, s2 = _exp_parts(x, True)
    return vfma(s1, q, s1)


@inline
def expm1_nonpositive(x):
    """exp(x) - 1 for x <= 0 without cancellation near 0: 2^n q + (2^n - 1), with q = exp(r) - 1 from the
    polynomial (for |x| <= ln2/2, n = 0 and the result is q itself). -1 below the range, NaN for NaN."""
    q, s1, s2 = _exp_parts(x, True)
    return vfma(s1, q, s1 - elem(x, 1.0))


@inline
def sigmoid_bits(z):
    """1 / (1 + exp(-z)), with exp only of -|z| (as pointwise.sigmoid): (1 or e) / (1 + e), e = exp(-|z|).
    The numerator is chosen before the division, so one division ends the dependency chain (pointwise
    multiplies e by the reciprocal after it: the two differ by one rounding for z < 0)."""
    one = elem(z, 1.0)
    e = exp_nonpositive(-vabs(z))
    return vselect(z >= elem(z, 0.0), one, e) / (one + e)


@inline
def tanh_bits(z):
    """tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|), written as -m / (2 + m) with m = expm1(-2|z|)
    so that small |z| keeps its relative accuracy (1 - e would cancel). NaN for NaN."""
    m = expm1_nonpositive(elem(z, -2.0) * vabs(z))
    t = -m / (elem(z, 2.0) + m)
    return vselect(z < elem(z, 0.0), -t, t)


# log(m), m in [sqrt(1/2), sqrt(2)): 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.1716, as the series
# 2 s (1 + s^2/3 + s^4/5 + ...): 5 terms leave 2e-9 (float32), 10 terms 6e-19 (float64) relative.
# log1p(e), e in [0, 1]: the same series with s = e / (2 + e) <= 1/3 (8 and 16 terms), exact relative
# accuracy for tiny e (no 1 + e is formed, so nothing cancels).
@inline
def _atanh_series(s, terms):
    # 2 atanh(s) = 2 s sum_{i < terms} s^(2i) / (2i + 1), Horner in s^2.
    s2 = s * s
    p = vfill(s, 1.0 / (2 * terms - 1))
    for i in range(terms - 2, -1, -1):
        p = vfma(p, s2, elem(s, 1.0) / elem(s, 2 * i + 1))
    return elem(s, 2.0) * s * p


@inline
def log_bits(x):
    """log(x) for positive normal x (scalar or lane vector): the exponent from the bits, the mantissa folded
    into [sqrt(1/2), sqrt(2)), an atanh series. inf for inf, NaN for NaN; zero, negative and subnormal x are
    outside its contract (softmax's sum of exps is >= 1)."""
    m, e = vsplit_exponent(x)
    big = m > elem(x, 1.4142135623730951)
    m = vselect(big, m * elem(x, 0.5), m)
    e = vselect(big, e + elem(x, 1.0), e)
    s = (m - elem(x, 1.0)) / (m + elem(x, 1.0))
    if is_single(x):
        log_m = _atanh_series(s, 5)
    else:
        log_m = _atanh_series(s, 10)
    result = vfma(e, elem(x, LN2_HI), vfma(e, elem(x, LN2_LO), log_m))
    result = vselect(x >= elem(x, math.inf), x, result)
    return vselect(x != x, x, result)


@inline
def log1p_unit(e):
    """log(1 + e) for e in [0, 1] (binary cross-entropy's log1p(exp(-|z|))), relative accuracy kept for tiny e."""
    s = e / (elem(e, 2.0) + e)
    if is_single(e):
        return _atanh_series(s, 8)
    return _atanh_series(s, 16)


# --- activation passes: compiled on their own ---------------------------------------------------------------
@intrinsic
def _not_inlined(typingctx):
    """Call first in a function that LLVM must not inline into its caller (the function attribute noinline)."""
    def codegen(context, builder, signature, args):
        builder.function.attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen


# sigmoid and tanh layers run as functions of their own, NOT inlined into the fused kernel. Inlined, where
# dozens of pointers and counters are live, LLVM kept the sigmoid's 13 constants as absolute addresses in
# general registers (numba's JIT code model has no rip-relative loads) and shuffled them with 30 register
# moves per vector (109 instructions a 16-lane vector; 79 in a function of its own). The call costs a few
# nanoseconds a layer and block; for the cheap activations (and all of backward) it cost more than it saved:
# W1 with every layer out of line ran 4% slower than with only this one. The code is repeated below rather
# than shared through an inline helper: numba binds an inlined function's array arguments with reference-count
# updates, atomic ones, inside the loops (W1 ran 50% slower that way). The kernel calls it by symbol (see
# _jit.SeparatelyCompiled), as it calls cpu.optimizer_step: a cold first fit's helper process compiles them
# while this process compiles the kernel (see kernel_slots).
def _make_forward(act):
    def forward(work, params, in_at, out_at, n_in, n_out, w0):
        # work[out_at + j lanes] = act(b[j] + sum_i W[i, j] work[in_at + i lanes]) for j < n_out.
        _not_inlined()
        prefer_wide_vectors()
        lanes = lane_count(work)
        zero = vsplat(0.0, work)
        b0 = w0 + n_in * n_out
        for j in range(n_out):
            if n_in == 1:  # one input (W1's first layer)
                z = vfma(vload(work, in_at), sload(params, w0 + j), sload(params, b0 + j))
            else:
                # Two accumulators (even and odd i): one chain of FMAs waits 4 cycles an input on Zen 3
                # (W1's 16-input output unit: 7.5% of the kernel's time with one).
                acc = vsplat(sload(params, b0 + j), work)
                acc2 = zero
                for i in range(0, n_in - 1, 2):
                    acc = vfma(vload(work, in_at + i * lanes), sload(params, w0 + i * n_out + j), acc)
                    acc2 = vfma(vload(work, in_at + (i + 1) * lanes), sload(params, w0 + (i + 1) * n_out + j), acc2)
                if n_in % 2 == 1:
                    acc = vfma(vload(work, in_at + (n_in - 1) * lanes), sload(params, w0 + (n_in - 1) * n_out + j),
                               acc)
                z = acc + acc2
            if act == SIGMOID:
                vstore(work, out_at + j * lanes, sigmoid_bits(z))
            else:
                vstore(work, out_at + j * lanes, tanh_bits(z))

    # one name each (the slot's symbol and the cache's file are named after it)
    forward.__name__ = forward.__qualname__ = f"forward_{ACTIVATION_NAMES[act]}"
    return SeparatelyCompiled(cpu_jit(**FAST)(forward), _forward_signature)


def _forward_signature(f):
    vector = types.Array(f, 1, "C")
    return (vector, vector) + (types.int64,) * 5


forward_sigmoid = _make_forward(SIGMOID)
forward_tanh = _make_forward(TANH)


# --- the fused kernel ----------------------------------------------------------------------------------------
def workspace_length(sizes, dtype, n_samples: int = 0) -> int:
    """Length of train_epochs_narrow's ``work`` (dtype, 1-D): lanes x (P + 2 sum(sizes) + k + 1 + data) numbers.

    Rows of ``lanes`` numbers (64 bytes, a cache line when the buffer is 64-byte aligned: make_workspace):
    P rows of per-lane weight-gradient partial sums (in the flat parameter order), sum(sizes) rows of the
    block's activations (layer l's unit u at row P + unit_offsets[l] + u; layer 0 = the gathered inputs), as
    many of deltas (d loss / d pre-activation, same indexing), k rows of the block's targets, one of lane
    losses; then, with n_samples > 0, (n_in + k) ceil(n_samples / lanes) rows where a full-batch, in-order
    call transposes X and Y once into lane blocks (its epochs then read them in place: no per-block
    gather). A shorter buffer is valid; such calls then gather every block."""
    sizes = [int(s) for s in sizes]
    lanes = LANES[np.dtype(dtype)]
    n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    data_rows = (sizes[0] + sizes[-1]) * (-(-int(n_samples) // lanes))
    return lanes * (n_params + 2 * sum(sizes) + sizes[-1] + 1 + data_rows)


def make_workspace(sizes, dtype, n_samples: int = 0) -> np.ndarray:
    """A zeroed, 64-byte aligned ``work`` buffer for train_epochs_narrow (see workspace_length; build once
    per fit and data set, reusable across calls)."""
    dtype = np.dtype(dtype)
    n = workspace_length(sizes, dtype, n_samples)
    raw = np.zeros(n + 64 // dtype.itemsize, dtype)
    skip = (-raw.ctypes.data % 64) // dtype.itemsize
    return raw[skip:skip + n]


def supports(sizes) -> bool:
    """Whether train_epochs_narrow is the faster path for layer widths ``sizes`` (input first): every layer,
    the input included, at most NARROW_MAX_WIDTH (32) wide.

    Measured against cpu.train_epochs on its product engine (python -m dev.bench_narrow --widths /
    --shapes; relu, softmax CE, SGD, shuffled batches of 32, float32, per-round ratios cpu/narrow, medians of
    3), 2026-12-03 on an Intel Xeon (AVX-512; KVM reports family 6 model 167), then the same with
    NUMBA_CPU_NAME=haswell (8-lane AVX2 code on that CPU): 16-w-w-10 3.99x / - (w = 8), 2.82x / 2.96x (16),
    2.10x / 2.13x (32), 0.91x / 0.98x (48), 0.64x / 0.94x (64), 0.47x (128); 64-128-10 (W2's network) 0.49x /
    0.68x; 1-16-1 (W1's) 7.1x; 1-32-32-1 2.49x; 784-32-10 0.37x. The nest's cost per parameter per block is
    one 64-byte read-modify-write of its partial sums, where the engine's register tiles reuse each loaded
    weight across 6 rows: past about 40 units a layer the engine wins. (Before the engine, on an AMD EPYC Zen
    3 against the older general path, the crossover was at 192-256 and this bound was 128.)"""
    return len(sizes) >= 2 and int(max(int(s) for s in sizes)) <= NARROW_MAX_WIDTH


def _make_kernel(has_sigmoid, has_tanh, has_relu, has_leaky, loss):
    # One specialisation: the activations present (booleans) and the loss are closure constants, so numba
    # prunes the other branches before typing and inlining them, and caches one entry per configuration. They
    # pay where a configuration is first compiled (the seed's 1-16-1 sigmoid MSE fit, cold, AMD EPYC Zen 4 under
    # load, medians of 3: 6.5 s like this, 7.1 s with the activations as run-time codes, 9.2 s with the loss
    # too). The optimizer is a run-time code: cpu.optimizer_step is compiled once either way, and a constant only
    # multiplied the kernels (SGD, Adam and AdamW each compiled the same code).

    @cpu_jit(**FAST)  # serial: these kernels hold no prange
    def kernel(params, opt_state, steps_done, grads, backup, work, X, Y, orders, lrs, epoch_losses, sizes,
               param_offsets, unit_offsets, act_codes, optimizer, hyper, batch_size, target_loss):
        # params (P,), opt_state (2, P), steps_done (1,), grads (P,), backup (3, P), work (see
        # workspace_length), X (n, n_in), Y (n, k), orders (E, n) or (E, 0), lrs (E,), epoch_losses (E,),
        # sizes (L + 1,), param_offsets (L,), unit_offsets (L + 2,), act_codes (L,), hyper (N_HYPER,).
        prefer_wide_vectors()
        lanes = lane_count(work)
        dtype = params.dtype.type
        n = X.shape[0]
        n_in0 = X.shape[1]
        k = Y.shape[1]
        x_flat = simd.flat(X)
        y_flat = simd.flat(Y)
        orders_flat = simd.flat(orders)
        n_params = params.shape[0]
        n_layers = sizes.shape[0] - 1
        n_units = unit_offsets[n_layers + 1]
        act_row = n_params  # rows of work: see workspace_length
        delta_row = n_params + n_units
        target_at = (n_params + 2 * n_units) * lanes
        loss_at = target_at + k * lanes
        logit_at = (act_row + unit_offsets[n_layers]) * lanes
        dlogit_at = (delta_row + unit_offsets[n_layers]) * lanes
        in_order = orders.shape[1] == 0
        zero = vsplat(0.0, work)
        one = elem(work, 1.0)
        # A full-batch, in-order call sees the same blocks every epoch: transpose X and Y into lane blocks
        # once, where the workspace has room for them (see workspace_length).
        data_at = loss_at + lanes
        block_rows = n_in0 + k
        n_blocks = (n + lanes - 1) // lanes
        pretransposed = in_order and batch_size >= n and work.shape[0] >= data_at + n_blocks * block_rows * lanes
        if pretransposed:
            for b in range(n_blocks):
                valid = min(lanes, n - b * lanes)
                at = data_at + b * block_rows * lanes
                for f in range(n_in0):
                    vstore(work, at + f * lanes, vgather_rows(x_flat, b * lanes, valid, n_in0, f))
                for j in range(k):
                    vstore(work, at + (n_in0 + j) * lanes, vgather_rows(y_flat, b * lanes, valid, k, j))
        for epoch in range(lrs.shape[0]):
            cpu.start_epoch(backup, params, opt_state)
            step0 = steps_done[0]
            total = 0.0
            for start in range(0, n, batch_size):
                n_rows = min(batch_size, n - start)
                inv_divisor = dtype(1.0 / loss_divisor(loss, n_rows, k))
                for first in range(0, n_rows, lanes):
                    valid = min(lanes, n_rows - first)
                    if pretransposed:  # this block's inputs and targets, transposed at the top of the call
                        x_at = data_at + (first // lanes) * block_rows * lanes
                        t_at = x_at + n_in0 * lanes
                    else:  # gathered: lane l = sample first + l of the batch, lanes >= valid repeat lane 0's
                        x_at = act_row * lanes
                        t_at = target_at
                        if in_order:
                            for f in range(n_in0):
                                vstore(work, x_at + f * lanes, vgather_rows(x_flat, start + first, valid, n_in0, f))
                            for j in range(k):
                                vstore(work, t_at + j * lanes, vgather_rows(y_flat, start + first, valid, k, j))
                        else:  # orders_flat, not orders[epoch]: a view per block costs atomic refcounts
                            position = epoch * n + start + first
                            for f in range(n_in0):
                                vstore(work, x_at + f * lanes,
                                       vgather_ordered(x_flat, orders_flat, position, valid, n_in0, f))
                            for j in range(k):
                                vstore(work, t_at + j * lanes,
                                       vgather_ordered(y_flat, orders_flat, position, valid, k, j))
                    # -- forward: sigmoid and tanh layers in functions of their own (see _make_forward), the
                    # others inline (the same unit sums)
                    for layer in range(n_layers):
                        n_in = sizes[layer]
                        n_out = sizes[layer + 1]
                        w0 = param_offsets[layer]
                        in_at = x_at if layer == 0 else (act_row + unit_offsets[layer]) * lanes
                        out_at = (act_row + unit_offsets[layer + 1]) * lanes
                        act = act_codes[layer]
                        if has_sigmoid and act == SIGMOID:
                            forward_sigmoid(work, params, in_at, out_at, n_in, n_out, w0)
                            continue
                        if has_tanh and act == TANH:
                            forward_tanh(work, params, in_at, out_at, n_in, n_out, w0)
                            continue
                        b0 = w0 + n_in * n_out
                        for j in range(n_out):
                            if n_in == 1:
                                z = vfma(vload(work, in_at), sload(params, w0 + j), sload(params, b0 + j))
                            else:
                                acc = vsplat(sload(params, b0 + j), work)
                                acc2 = zero
                                for i in range(0, n_in - 1, 2):
                                    acc = vfma(vload(work, in_at + i * lanes), sload(params, w0 + i * n_out + j), acc)
                                    acc2 = vfma(vload(work, in_at + (i + 1) * lanes),
                                                sload(params, w0 + (i + 1) * n_out + j), acc2)
                                if n_in % 2 == 1:
                                    acc = vfma(vload(work, in_at + (n_in - 1) * lanes),
                                               sload(params, w0 + (n_in - 1) * n_out + j), acc)
                                z = acc + acc2
                            if has_relu and act == RELU:
                                z = vselect(z > zero, z, zero)  # NaN -> 0, as pointwise.activate
                            elif has_leaky and act == LEAKY_RELU:
                                z = vselect(z > zero, z, z * elem(z, LEAKY_RELU_SLOPE))
                            vstore(work, out_at + j * lanes, z)
                    # -- loss and dlogits (pointwise.loss_grad_row's arithmetic, lane by lane)
                    mask = vlanes_below(valid, work)
                    lane_loss = zero
                    if loss == MSE:
                        two_over = elem(work, 2.0) * inv_divisor
                        for j in range(k):
                            diff = vload(work, logit_at + j * lanes) - vload(work, t_at + j * lanes)
                            lane_loss = vfma(diff, diff, lane_loss)
                            vstore(work, dlogit_at + j * lanes, vselect(mask, two_over * diff, zero))
                    elif loss == BINARY_CROSS_ENTROPY:
                        one = elem(work, 1.0)
                        for j in range(k):
                            z = vload(work, logit_at + j * lanes)
                            t = vload(work, t_at + j * lanes)
                            e = exp_nonpositive(-vabs(z))
                            inv = one / (one + e)
                            q = vselect(z >= zero, inv, e * inv)
                            lane_loss = lane_loss + ((vmax(z, zero) - z * t) + log1p_unit(e))
                            vstore(work, dlogit_at + j * lanes, vselect(mask, (q - t) * inv_divisor, zero))
                    elif loss == POISSON:
                        for j in range(k):
                            z = vload(work, logit_at + j * lanes)
                            t = vload(work, t_at + j * lanes)
                            rate = exp_bits(z)
                            lane_loss = lane_loss + (rate - z * t)
                            vstore(work, dlogit_at + j * lanes, vselect(mask, (rate - t) * inv_divisor, zero))
                    else:  # SOFTMAX_CROSS_ENTROPY; the max is subtracted for stability only
                        zmax = vload(work, logit_at)
                        for j in range(1, k):
                            zmax = vmax(zmax, vload(work, logit_at + j * lanes))
                        sum_exp = zero
                        sum_target = zero
                        for j in range(k):
                            e = exp_nonpositive(vload(work, logit_at + j * lanes) - zmax)
                            vstore(work, dlogit_at + j * lanes, e)  # staged: the softmax numerators
                            sum_exp = sum_exp + e
                            sum_target = sum_target + vload(work, t_at + j * lanes)
                        log_sum_exp = zmax + log_bits(sum_exp)
                        inv_sum_exp = elem(work, 1.0) / sum_exp
                        for j in range(k):
                            t = vload(work, t_at + j * lanes)
                            lane_loss = vfma(t, log_sum_exp - vload(work, logit_at + j * lanes), lane_loss)
                            g = (vload(work, dlogit_at + j * lanes) * inv_sum_exp * sum_target - t) * inv_divisor
                            vstore(work, dlogit_at + j * lanes, vselect(mask, g, zero))
                    vstore(work, loss_at, vselect(mask, lane_loss, zero))
                    for lane in range(valid):  # float64 sum of float32 row losses, as cpu.train_epochs
                        total += sload(work, loss_at + lane)
                    # -- backward: the per-lane gradient partial sums (row p of work for parameter p) += in[i] dout[j]
                    # (weights) and dout[j] (biases); din[i] = (sum_j W[i, j] dout[j]) act'(in[i]), act' from
                    # the stored output (cpu._scale_by_activation_grad_rows's arithmetic)
                    for layer in range(n_layers - 1, -1, -1):
                        n_in = sizes[layer]
                        n_out = sizes[layer + 1]
                        w0 = param_offsets[layer]
                        b0 = w0 + n_in * n_out
                        in_at = x_at if layer == 0 else (act_row + unit_offsets[layer]) * lanes
                        dout_at = (delta_row + unit_offsets[layer + 1]) * lanes
                        din_at = (delta_row + unit_offsets[layer]) * lanes
                        for j in range(n_out):
                            g_at = (b0 + j) * lanes
                            vstore(work, g_at, vload(work, g_at) + vload(work, dout_at + j * lanes))
                        if layer == 0:
                            # Weights only (no input gradient below the first layer). Inputs outer, outputs
                            # inner: the inner loop runs along a row of W's gradient (W1's 1-input layer: one
                            # loop of 16 instead of 16 loops of one, 3x faster for this part).
                            for i in range(n_in):
                                a = vload(work, in_at + i * lanes)
                                for j in range(n_out):
                                    g_at = (w0 + i * n_out + j) * lanes
                                    vstore(work, g_at, vfma(a, vload(work, dout_at + j * lanes), vload(work, g_at)))
                            continue
                        act = act_codes[layer - 1]
                        for i in range(n_in):
                            y = vload(work, in_at + i * lanes)
                            if n_out == 1:  # one output (regression, binary heads; W1): no inner loop per input
                                d = vload(work, dout_at)
                                g_at = (w0 + i) * lanes
                                vstore(work, g_at, vfma(y, d, vload(work, g_at)))
                                back = d * sload(params, w0 + i)
                            else:
                                back = zero
                                for j in range(n_out):
                                    d = vload(work, dout_at + j * lanes)
                                    g_at = (w0 + i * n_out + j) * lanes
                                    vstore(work, g_at, vfma(y, d, vload(work, g_at)))
                                    back = vfma(d, sload(params, w0 + i * n_out + j), back)
                            if has_sigmoid and act == SIGMOID:
                                back = back * (y * (one - y))
                            elif has_tanh and act == TANH:
                                back = back * (one - y * y)
                            elif has_relu and act == RELU:
                                back = vselect(y > zero, back, zero)
                            elif has_leaky and act == LEAKY_RELU:
                                back = back * vselect(y > zero, one, elem(y, LEAKY_RELU_SLOPE))
                            vstore(work, din_at + i * lanes, back)
                # -- the step: each parameter's lanes summed (the partial sums zeroed for the next step)
                for i in range(n_params):
                    sstore(grads, i, vsum(vload(work, i * lanes)))
                    vstore(work, i * lanes, zero)
                steps_done[0] += 1
                # the engine's optimizer step, called by symbol: one compiled optimizer for both engines (a
                # cold script that fits a narrow and a wide network compiled two; W1 ran as fast: 1.62 ms)
                cpu.optimizer_step(params, opt_state, grads, lrs[epoch], optimizer, hyper, steps_done[0])
            epoch_loss = total / loss_divisor(loss, n, k)
            epoch_losses[epoch] = epoch_loss
            stopped = cpu.end_epoch(params, opt_state, steps_done, backup, step0, epoch, epoch_loss, target_loss)
            if stopped >= 0:
                return stopped
        return lrs.shape[0]

    return kernel


_KERNELS = {}


def kernel_key(act_codes, loss: int) -> tuple:
    """Which fused kernel these activation codes and loss code train with: (has_sigmoid, has_tanh, has_relu,
    has_leaky, loss), the closure constants of _make_kernel."""
    codes = frozenset(int(c) for c in np.asarray(act_codes).ravel())
    has_sigmoid, has_tanh = SIGMOID in codes, TANH in codes
    if has_sigmoid or has_tanh:
        return (has_sigmoid, has_tanh, RELU in codes, LEAKY_RELU in codes, int(loss))
    # Networks of relu, leaky_relu and identity layers share one kernel per loss: compiling both branches costs
    # nothing measurable (3-8-2 network, cold, AMD EPYC Zen 4: relu 3.1 s, relu and leaky_relu 3.05 s) and relu
    # networks' epochs take 1.0-1.04x the time (16-32-32-4, 8-32-1, 2-8-8-1; best of 6 alternating processes),
    # while the test suite compiles 16 fewer kernels (about 3 s each). Networks with sigmoid or tanh layers keep
    # the kernel of their exact set: with the relu and leaky_relu branches compiled in, the seed's 1-16-1 sigmoid
    # epoch ran 1.13-1.16x slower.
    return (False, False, True, True, int(loss))


def kernel_slots(key) -> list:
    """The separately compiled functions that the kernel of ``key`` (see kernel_key) calls by symbol: its sigmoid
    and tanh layers' forward and the optimizer step (the product engine's, cpu.optimizer_step). A cold first fit
    compiles them in its helper process while this one compiles the kernel (1-16-1 sigmoid network, AMD EPYC Zen
    4: 1.3 s of the kernel's 4.5 s)."""
    has_sigmoid, has_tanh = key[0], key[1]
    return [forward_sigmoid] * has_sigmoid + [forward_tanh] * has_tanh + [cpu.optimizer_step]


def kernel_for(act_codes, loss: int):
    """The compiled fused kernel for these activation codes (any per-layer mix) and loss code (see kernel_key).

    Its arguments: train_epochs_narrow's, without ``loss`` (compiled in). Look it up once per fit and call it
    directly to skip this function's dictionary look-up."""
    key = kernel_key(act_codes, loss)
    kernel = _KERNELS.get(key)
    if kernel is None:
        if key[4] not in LOSS_NAMES:
            raise ValueError(f"unknown loss code {loss}")
        kernel = _KERNELS[key] = _make_kernel(*key)
    return kernel


def train_epochs_narrow(params, opt_state, steps_done, grads, backup, work, X, Y, orders, lrs, epoch_losses,
                        sizes, param_offsets, unit_offsets, act_codes, loss, optimizer, hyper, batch_size,
                        target_loss):
    """Train ``len(lrs)`` epochs of a narrow network (see supports) in one compiled call; returns how many
    completed.

    The contract of fastbp.kernels.cpu.train_epochs, same arguments in the same order minus its workspaces
    (acts, deltas, targets_batch, row_losses, scratch) and path flags (narrow, wide), plus ``work``; same
    results to rounding:

    Parameters
    ----------
    params : (P,) float32 or float64, updated in place (flat W0, b0, W1, b1, ...; see fastbp.layout).
    opt_state : (2, P), updated in place: SGD's momentum buffer in row 0, Adam's moments in rows 0 and 1.
    steps_done : (1,) int64, updated in place: optimizer steps taken (torch's state["step"]).
    grads : (P,) workspace: holds the last step's gradient on return.
    backup : (3, P) workspace: params and opt_state at the start of the current epoch.
    work : (workspace_length(sizes, dtype),) workspace, 1-D C-contiguous (make_workspace builds one). Its
        gradient rows must be zero on entry: make_workspace's are, and every call leaves them zero.
    X : (n, n_in), Y : (n, k), C-contiguous, params' dtype.
    orders : (E, n) int64, each epoch's sample order; (E, 0) means in order.
    lrs : (E,) float64, each epoch's learning rate.
    epoch_losses : (E,) float64, written: each epoch's mean loss over its samples (each under the weights
        of the time its batch was processed).
    sizes, param_offsets, unit_offsets : int64 arrays of fastbp.layout.Layout.
    act_codes : (L,) int64, pointwise activation codes per layer (the output layer's: identity, the loss
        transforms it; like cpu.train_epochs, the gradient is taken w.r.t. the output layer's outputs).
    loss, optimizer : pointwise codes. hyper : (N_HYPER,) float64, indexed by pointwise.H_*.
    batch_size : int. target_loss : float, stop after an epoch whose loss is <= it.

    Returns
    -------
    int : epochs completed. After an epoch whose loss is not finite, params, opt_state and steps_done are
    restored to that epoch's start and it is not counted (its loss is in epoch_losses[returned]).

    Allocates nothing; serial.
    """
    # X and Y read-only, as the CPU backend passes them: one compiled kernel for both (see _jit.read_only)
    return kernel_for(act_codes, loss)(
        params, opt_state, steps_done, grads, backup, work, read_only(X), read_only(Y), orders, lrs, epoch_losses,
        sizes, param_offsets, unit_offsets, act_codes, optimizer, hyper, batch_size, target_loss)


# --- the reference: one sample at a time ---------------------------------------------------------------------
# The reference's loss rule: pointwise.loss_grad_row compiled as a function of its own and called, where the fast
# kernels inline their rules. numba's inline pass copies the callee's IR into the caller, which for the four
# losses of loss_grad_row was about 1 s of the reference's 5 s compile per dtype (AMD EPYC Zen 4); the reference
# is serial and slow by design, and a call per sample costs it nothing that matters.
_loss_grad_row_called = cpu_jit()(loss_grad_row.py_func)


@cpu_jit()
def train_epochs_naive(params, opt_state, steps_done, grads, backup, work, X, Y, orders, lrs, epoch_losses,
                       sizes, param_offsets, unit_offsets, act_codes, loss, optimizer, hyper, batch_size,
                       target_loss):
    """train_epochs_narrow's contract and results, computed the obvious way, serially: each sample forward
    through every layer (pointwise.activate), its loss and gradient (pointwise.loss_grad_row), backward
    into grads (P,), summed over the batch, then cpu.optimizer_step. ``work`` needs 3 sum(sizes) + k numbers:
    one sample's activations, deltas, targets and staging for the output gradient. Serial, scalar, slow."""
    n = X.shape[0]
    k = Y.shape[1]
    n_params = params.shape[0]
    n_layers = sizes.shape[0] - 1
    n_units = unit_offsets[n_layers + 1]
    acts = work[:n_units]
    deltas = work[n_units:2 * n_units]
    target = work[2 * n_units:2 * n_units + k]
    in_order = orders.shape[1] == 0
    for epoch in range(lrs.shape[0]):
        cpu.start_epoch(backup, params, opt_state)
        step0 = steps_done[0]
        total = 0.0
        for start in range(0, n, batch_size):
            n_rows = min(batch_size, n - start)
            inv_divisor = params.dtype.type(1.0 / loss_divisor(loss, n_rows, k))
            for i in range(n_params):
                grads[i] = 0
            for r in range(n_rows):
                src = start + r if in_order else orders[epoch, start + r]
                for f in range(X.shape[1]):
                    acts[f] = X[src, f]
                for j in range(k):
                    target[j] = Y[src, j]
                for layer in range(n_layers):
                    n_in = sizes[layer]
                    n_out = sizes[layer + 1]
                    w0 = param_offsets[layer]
                    for j in range(n_out):
                        z = params[w0 + n_in * n_out + j]
                        for kk in range(n_in):
                            z += acts[unit_offsets[layer] + kk] * params[w0 + kk * n_out + j]
                        acts[unit_offsets[layer + 1] + j] = activate(z, act_codes[layer])
                out = unit_offsets[n_layers]
                total += _loss_grad_row_called(deltas[out:out + k], acts[out:out + k], target, loss,
                                                inv_divisor)
                for layer in range(n_layers - 1, -1, -1):
                    n_in = sizes[layer]
                    n_out = sizes[layer + 1]
                    w0 = param_offsets[layer]
                    for j in range(n_out):
                        grads[w0 + n_in * n_out + j] += deltas[unit_offsets[layer + 1] + j]
                    for kk in range(n_in):
                        a = acts[unit_offsets[layer] + kk]
                        back = params.dtype.type(0.0)
                        for j in range(n_out):
                            d = deltas[unit_offsets[layer + 1] + j]
                            grads[w0 + kk * n_out + j] += a * d
                            back += params[w0 + kk * n_out + j] * d
                        if layer > 0:
                            deltas[unit_offsets[layer] + kk] = back * activation_grad(a, act_codes[layer - 1])
            steps_done[0] += 1
            cpu.optimizer_step(params, opt_state, grads, lrs[epoch], optimizer, hyper, steps_done[0])
        epoch_loss = total / loss_divisor(loss, n, k)
        epoch_losses[epoch] = epoch_loss
        stopped = cpu.end_epoch(params, opt_state, steps_done, backup, step0, epoch, epoch_loss, target_loss)
        if stopped >= 0:
            return stopped
    return lrs.shape[0]


def naive_workspace_length(sizes) -> int:
    """Length of train_epochs_naive's ``work``: 3 sum(sizes) + k."""
    return 3 * int(sum(int(s) for s in sizes)) + int(sizes[-1])


