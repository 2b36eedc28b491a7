"""Explicit SIMD vectors for fastbp's CPU kernels, through numba's public extension API.

LLVM's loop vectoriser does not keep a matrix product's output tile in registers across the summed axis
(see /work/shared/cpu-engine.md: a 6x64 tile as a local accumulator array ran at 25-30 GFLOP/s on a Zen 4
core, explicit 16-lane vectors at 113). This module gives compiled code a vector value type and the handful
of operations a register-blocked product and its epilogues need; ``fastbp.kernels.gemm`` is built on it.

The vector type
    ``SimdVector(dtype, lanes)``: a numba type whose data model is LLVM's ``<lanes x float>`` /
    ``<lanes x double>`` (a ``models.PrimitiveModel`` over ``llvmlite.ir.VectorType``), so a vector variable
    is one SSA value that LLVM keeps in one register (or, wider than the target's registers, a few).
    Vectors exist only inside compiled code: they are neither boxed nor unboxed.

The width, fixed when this module is imported (``VECTOR_BITS``):
    512 bits (16 float32 / 8 float64 lanes) where the target numba compiles for has AVX-512F, 256 bits
    (8 / 4) with AVX, 128 bits (4 / 2) elsewhere (SSE2, NEON, ...; LLVM lowers 128-bit vectors on every
    target numba supports). The target is the one numba's ``config`` describes: ``NUMBA_CPU_FEATURES`` when
    set, else the host's features (what numba passes to LLVM); when only ``NUMBA_CPU_NAME`` is set, the
    narrower of that CPU's own width (asked from LLVM) and the host's, so ``NUMBA_CPU_NAME=haswell`` on an
    AVX-512 host takes the 256-bit path, and ``NUMBA_CPU_NAME=generic`` the 128-bit one.
    ``FASTBP_SIMD_BITS=128|256|512`` overrides the choice (for tests: LLVM splits a vector wider than the
    target's registers into several, so every width computes correctly everywhere, fast only at its own).
    numba's disk cache keys on the CPU name and features, which decide the width, but not on this
    override: kernels that use these vectors must not cache while ``VECTOR_BITS_FORCED`` (gemm does not).

The operations (compiled code only; ``x`` an array, a float or a vector gives the element type):
    lanes(x)                          number of lanes of x's element type (a compile-time constant)
    zero(x)                           vector of zeros
    broadcast(s)                      every lane = the float s (its type gives the vector's)
    load(a, offset)                   a's elements offset .. offset + lanes - 1
    load_partial(a, offset, count)    the first ``count`` of them, the other lanes 0 (masked: reads nothing
                                      beyond element offset + count - 1)
    broadcast_load(a, offset)         every lane = a's element at offset
    store(a, offset, v)               write v's lanes to elements offset .. offset + lanes - 1
    store_partial(a, offset, v, count) write only the first ``count`` lanes
    fma(x, y, z)                      x * y + z, one rounding (llvm.fma) where the target has FMA, else
                                      llvm.fmuladd (a multiply and an add)
    add(x, y), sub(x, y), mul(x, y)   lane by lane
    max(x, y)                         x where x > y, else y (so max(nan, 0) = 0, as relu(nan) in pointwise)
    select_gt(x, y, a, b)             a where x > y, else b (lane by lane; b where either is nan)
    hsum(v)                           sum of the lanes, as a pairwise tree in a fixed order (deterministic)
    extract(v, i)                     lane i (i a compile-time constant or a variable)
    matrix(a, offset, n_rows, n_cols) the (n_rows, n_cols) C-contiguous view of the 1-D array a's elements from
                                      offset (a.reshape's view, without numba's reshape: see matrix)
    flat(a)                           the 1-D view of the C-contiguous array a's elements
    stack_vectors(x, count)           a 1-D array of count * lanes elements of x's element type in the calling
                                      function's stack frame (count a compile-time constant; contents
                                      undefined; valid until that function returns): a register tile's
                                      spill slot, without a heap allocation
    load_transposed(a, offset, stride) the lanes x lanes block whose row t is a's elements from
                                      offset + t * stride, transposed: a tuple whose vector k holds
                                      element k of every row (log2(lanes) rounds of shuffles)

Memory contract: ``offset`` counts ELEMENTS from the array's first element as laid out in memory (for a
C-contiguous 2-D array ``a[i, j]`` is at ``i * a.shape[1] + j``; for a row-contiguous view, at
``i * (a.strides[0] // a.itemsize) + j``), the elements a vector covers must be contiguous, and nothing is
bounds-checked: the caller guarantees that every element touched lies inside the array. Loads and stores
are unaligned (alignment of one element).
"""
from __future__ import annotations

import os

import operator

import numpy as np
from llvmlite import ir
from numba.core import cgutils, config, types
from numba.core.imputils import impl_ret_borrowed
from numba.core.errors import TypingError
from numba.extending import intrinsic, lower_builtin, models, register_model, type_callable

# --- which width --------------------------------------------------------------------------------------------
_PROBE_IR = """
define void @wide(ptr %p) {
  %v = load <16 x float>, ptr %p, align 4
  %w = fadd <16 x float> %v, %v
  store <16 x float> %w, ptr %p, align 4
  ret void
}
define void @avx(ptr %p) {
  %v = load <8 x float>, ptr %p, align 4
  %w = fadd <8 x float> %v, %v
  store <8 x float> %w, ptr %p, align 4
  ret void
}
define void @fused(ptr %p) {
  %v = load <4 x float>, ptr %p, align 4
  %w = call <4 x float> @llvm.fma.v4f32(<4 x float> %v, <4 x float> %v, <4 x float> %v)
  store <4 x float> %w, ptr %p, align 4
  ret void
}
declare <4 x float> @llvm.fma.v4f32(<4 x float>, <4 x float>, <4 x float>)
"""


def _probe_llvm(cpu_name: str, features: str) -> tuple[int, bool]:
    """(vector bits, has fma) of the LLVM target ``cpu_name`` with ``features``, read from the assembly LLVM
    emits for a 16-lane add (zmm registers?), an 8-lane add (ymm?) and a 4-lane fma (vfmadd?). About 10 ms.
    Asking LLVM itself keeps this right for CPU names and feature spellings no table here lists."""
    import llvmlite.binding as ll

    if not ll.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return 128, True  # NEON / VSX / ...: 128-bit vectors; llvm.fma is one instruction there
    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    module = ll.parse_assembly(_PROBE_IR)
    machine = ll.Target.from_default_triple().create_target_machine(cpu=cpu_name, features=features, opt=0)
    asm = machine.emit_assembly(module)
    body = {name: asm.split(name + ":", 1)[1].split(".Lfunc_end", 1)[0] for name in ("wide", "avx", "fused")}
    bits = 512 if "zmm" in body["wide"] else 256 if "ymm" in body["avx"] else 128
    return bits, "vfmadd" in body["fused"]


def _bits_from_features(features: str) -> tuple[int, bool]:
    """(vector bits, has fma) from an LLVM feature string such as ``+avx2,+fma,-avx512f,...``."""
    enabled = {f[1:] for f in features.split(",") if f.startswith("+")}
    import llvmlite.binding as ll

    if not ll.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return 128, True
    bits = 512 if "avx512f" in enabled else 256 if "avx" in enabled else 128
    return bits, "fma" in enabled


def choose_vector_bits() -> tuple[int, bool, str]:
    """(vector bits, has fma, why) for the target numba compiles for in this process (see the module notes)."""
    from numba.core.codegen import get_host_cpu_features  # numba's own host features (honours NUMBA_ENABLE_AVX)

    forced = os.environ.get("FASTBP_SIMD_BITS", "").strip()
    if config.CPU_FEATURES is not None:
        import llvmlite.binding as ll

        name = config.CPU_NAME or ll.get_host_cpu_name()
        bits, has_fma = _probe_llvm(name, config.CPU_FEATURES)
        why = f"NUMBA_CPU_NAME={name!r} with NUMBA_CPU_FEATURES"
    else:
        bits, has_fma = _bits_from_features(get_host_cpu_features())
        why = "host CPU features"
        if config.CPU_NAME is not None:
            name_bits, name_fma = _probe_llvm(config.CPU_NAME, "")
            bits, has_fma = min(bits, name_bits), has_fma and name_fma
            why = f"NUMBA_CPU_NAME={config.CPU_NAME!r} (and the host's features)"
    if forced:
        if forced not in ("128", "256", "512"):
            raise ValueError(f"FASTBP_SIMD_BITS must be 128, 256 or 512, not {forced!r}")
        return int(forced), has_fma, f"FASTBP_SIMD_BITS={forced} (the target: {bits} bits, {why})"
    return bits, has_fma, why


VECTOR_BITS, HAS_FMA, VECTOR_BITS_REASON = choose_vector_bits()
# True when FASTBP_SIMD_BITS chose the width: numba's disk cache cannot tell (see the module notes).
VECTOR_BITS_FORCED = bool(os.environ.get("FASTBP_SIMD_BITS", "").strip())


def lanes_for(dtype) -> int:
    """Lanes of a vector of ``dtype`` (numpy or numba float32/float64) at this process's VECTOR_BITS."""
    bits = dtype.bitwidth if isinstance(dtype, types.Float) else 8 * np.dtype(dtype).itemsize
    return VECTOR_BITS // bits


# --- the type -----------------------------------------------------------------------------------------------
_FLOATS = (types.float32, types.float64)


class SimdVector(types.Type):
    """numba type of an LLVM vector of ``lanes`` ``dtype`` (types.float32 or types.float64) values."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"SimdVector({dtype}, {lanes})")


@register_model(SimdVector)
class SimdVectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = ir.FloatType() if fe_type.dtype == types.float32 else ir.DoubleType()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


class SimdMask(types.Type):
    """numba type of an LLVM vector of ``lanes`` booleans: the result of comparing SimdVectors (see select)."""

    def __init__(self, lanes):
        self.lanes = lanes
        super().__init__(name=f"SimdMask({lanes})")


@register_model(SimdMask)
class SimdMaskModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(ir.IntType(1), fe_type.lanes))


_VECTOR_TYPES: dict = {}


def vector_type(dtype) -> SimdVector:
    """The SimdVector type of ``dtype`` (types.float32 / types.float64) at this process's width."""
    if dtype not in _VECTOR_TYPES:
        _VECTOR_TYPES[dtype] = SimdVector(dtype, VECTOR_BITS // dtype.bitwidth)
    return _VECTOR_TYPES[dtype]


def _element_type(x):
    # The float element type of an array, a float scalar or a vector argument (None for anything else).
    if isinstance(x, SimdVector):
        return x.dtype
    if isinstance(x, types.Array) and x.dtype in _FLOATS:
        return x.dtype
    if x in _FLOATS:
        return x
    return None


def _require(condition, message):
    if not condition:
        raise TypingError("fastbp.kernels.simd: " + message)


def _llvm_vector(vec_type: SimdVector):
    element = ir.FloatType() if vec_type.dtype == types.float32 else ir.DoubleType()
    return ir.VectorType(element, vec_type.lanes)


def _intrinsic_suffix(vec_type: SimdVector) -> str:
    return f"v{vec_type.lanes}f{vec_type.dtype.bitwidth}"


def _element_pointer(context, builder, array_type, array_value, offset_type, offset_value):
    # Address of the element ``offset`` elements past the array's first one (no bounds check).
    array = context.make_array(array_type)(context, builder, array_value)
    offset = context.cast(builder, offset_value, offset_type, types.intp)
    return builder.gep(array.data, [offset])


def _lane_mask(builder, lanes, count_value):
    # <lanes x i1>: lane t is on where t < count.
    i32 = ir.IntType(32)
    iota = ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))
    count = builder.trunc(count_value, i32) if count_value.type.width > 32 else count_value
    if count.type.width < 32:
        count = builder.sext(count, i32)
    splat = builder.insert_element(ir.Constant(ir.VectorType(i32, lanes), ir.Undefined), count,
                                   ir.Constant(i32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
    return builder.icmp_signed("<", iota, splat)


def splat(builder, llvm_vector_type, scalar):
    """Codegen helper: the LLVM vector of type llvm_vector_type with every lane ``scalar``."""
    i32 = ir.IntType(32)
    lanes = llvm_vector_type.count
    vector = builder.insert_element(ir.Constant(llvm_vector_type, ir.Undefined), scalar, ir.Constant(i32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))


# --- operators: + - * / and unary - , comparisons ------------------------------------------------------------
# On two vectors of one type, or a vector and a plain number (broadcast): the fused narrow kernel's math is
# written with them, so that one source compiles for scalars and vectors. Emitted with these fast-math flags
# only: "contract" fuses a*b + c into an FMA; not "reassoc", which lets LLVM fold a Cody-Waite split
# (x - n c1) - n c2 back into x - n (c1 + c2) (pointwise.exp_fast compiled with reassoc measured 2.9e-7 max
# relative error in float32 and 2.4e-14 in float64, against 9.8e-8 and 7.8e-16 without it).
# type_callable + lower_builtin rather than @overload: an overload is a small function compiled and inlined at
# every use, which made type inference of the fused narrow kernel 3-4x slower.
OPERATOR_FLAGS = ("contract", "nsz")
_SCALAR_CLASSES = (types.Float, types.Integer)


def operand_type(*tys):
    """The result type of arithmetic on operands of these types: the SimdVector among them (numbers are
    broadcast), the float type when all are the same float, else None."""
    vectors = [t for t in tys if isinstance(t, SimdVector)]
    if vectors:
        vt = vectors[0]
        if all(t == vt or (isinstance(t, types.Number) and not isinstance(t, types.Complex)) for t in tys):
            return vt
        return None
    if all(isinstance(t, types.Float) for t in tys) and len(set(tys)) == 1:
        return tys[0]
    return None


def as_operand(context, builder, value, ty, result_ty):
    """value (of numba type ty) as an LLVM value of result_ty: numbers are cast to the element type and
    broadcast."""
    if isinstance(result_ty, SimdVector):
        if isinstance(ty, SimdVector):
            return value
        value = context.cast(builder, value, ty, result_ty.dtype)
        return splat(builder, context.get_value_type(result_ty), value)
    return context.cast(builder, value, ty, result_ty)


def _register_binary(op, llvm_op):
    @type_callable(op)
    def _typer(context):
        def typer(a, b):
            if isinstance(a, SimdVector) or isinstance(b, SimdVector):
                return operand_type(a, b)
            return None

        return typer

    def lower(context, builder, sig, args):
        x = as_operand(context, builder, args[0], sig.args[0], sig.return_type)
        y = as_operand(context, builder, args[1], sig.args[1], sig.return_type)
        return getattr(builder, llvm_op)(x, y, flags=OPERATOR_FLAGS)

    lower_builtin(op, SimdVector, SimdVector)(lower)
    for scalar in _SCALAR_CLASSES:
        lower_builtin(op, SimdVector, scalar)(lower)
        lower_builtin(op, scalar, SimdVector)(lower)


def _register_compare(op, symbol):
    @type_callable(op)
    def _typer(context):
        def typer(a, b):
            if isinstance(a, SimdVector) or isinstance(b, SimdVector):
                vt = operand_type(a, b)
                return None if vt is None else SimdMask(vt.lanes)
            return None

        return typer

    def lower(context, builder, sig, args):
        vt = operand_type(*sig.args)
        x = as_operand(context, builder, args[0], sig.args[0], vt)
        y = as_operand(context, builder, args[1], sig.args[1], vt)
        # Ordered comparisons (false when either side is NaN), as Python's; != is unordered (true for NaN).
        if symbol == "!=":
            return builder.fcmp_unordered(symbol, x, y)
        return builder.fcmp_ordered(symbol, x, y)

    lower_builtin(op, SimdVector, SimdVector)(lower)
    for scalar in _SCALAR_CLASSES:
        lower_builtin(op, SimdVector, scalar)(lower)
        lower_builtin(op, scalar, SimdVector)(lower)


for _op, _llvm_op in ((operator.add, "fadd"), (operator.sub, "fsub"), (operator.mul, "fmul"),
                      (operator.truediv, "fdiv")):
    _register_binary(_op, _llvm_op)
for _op, _symbol in ((operator.lt, "<"), (operator.gt, ">"), (operator.le, "<="), (operator.ge, ">="),
                     (operator.ne, "!=")):
    _register_compare(_op, _symbol)


@type_callable(operator.neg)
def _type_neg(context):
    def typer(a):
        return a if isinstance(a, SimdVector) else None

    return typer


@lower_builtin(operator.neg, SimdVector)
def _lower_neg(context, builder, sig, args):
    return builder.fneg(args[0], flags=OPERATOR_FLAGS)


# --- operations ---------------------------------------------------------------------------------------------
@intrinsic
def lanes(typingctx, x):
    """Number of lanes of a vector of x's element type: an intp constant."""
    dtype = _element_type(x)
    _require(dtype is not None, f"lanes() needs a float32/float64 array, scalar or vector, not {x}")
    count = x.lanes if isinstance(x, SimdVector) else vector_type(dtype).lanes

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, count)

    return types.intp(x), codegen


@intrinsic
def zero(typingctx, x):
    """A vector of zeros of x's element type."""
    dtype = _element_type(x)
    _require(dtype is not None, f"zero() needs a float32/float64 array, scalar or vector, not {x}")
    vec = vector_type(dtype) if not isinstance(x, SimdVector) else x

    def codegen(context, builder, signature, args):
        return ir.Constant(_llvm_vector(vec), None)  # zeroinitializer

    return vec(x), codegen


@intrinsic
def broadcast(typingctx, scalar):
    """A vector whose every lane is the float ``scalar``."""
    _require(scalar in _FLOATS, f"broadcast() needs a float32/float64 scalar, not {scalar}")
    vec = vector_type(scalar)

    def codegen(context, builder, signature, args):
        return splat(builder, _llvm_vector(vec), args[0])

    return vec(scalar), codegen


def _check_array(name, array, offset):
    _require(isinstance(array, types.Array) and array.dtype in _FLOATS,
             f"{name}() needs a float32/float64 array, not {array}")
    _require(isinstance(offset, types.Integer), f"{name}() needs an integer element offset, not {offset}")


@intrinsic
def load(typingctx, array, offset):
    """The vector of ``array``'s elements offset .. offset + lanes - 1 (unaligned, no bounds check)."""
    _check_array("load", array, offset)
    vec = vector_type(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        vector_pointer = builder.bitcast(pointer, _llvm_vector(vec).as_pointer())
        return builder.load(vector_pointer, align=array.dtype.bitwidth // 8)

    return vec(array, offset), codegen


@intrinsic
def broadcast_load(typingctx, array, offset):
    """A vector whose every lane is ``array``'s element at ``offset`` (one scalar load and a broadcast, which
    x86 does as one vbroadcastss/sd from memory)."""
    _check_array("broadcast_load", array, offset)
    vec = vector_type(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        scalar = builder.load(pointer, align=array.dtype.bitwidth // 8)
        return splat(builder, _llvm_vector(vec), scalar)

    return vec(array, offset), codegen


@intrinsic
def store(typingctx, array, offset, vector):
    """Write ``vector``'s lanes to ``array``'s elements offset .. offset + lanes - 1 (unaligned, unchecked)."""
    _check_array("store", array, offset)
    _require(isinstance(vector, SimdVector) and vector.dtype == array.dtype,
             f"store() needs a vector of the array's dtype {array.dtype}, not {vector}")
    _require(array.mutable, "store() needs a writable array")

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        vector_pointer = builder.bitcast(pointer, _llvm_vector(vector).as_pointer())
        builder.store(args[2], vector_pointer, align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(array, offset, vector), codegen


def _masked_intrinsic(builder, kind, vec, pointer_type):
    # llvm.masked.load / llvm.masked.store for this vector type, declared by name (llvmlite's
    # declare_intrinsic cannot name vector overloads). The i32 alignment operand is the form LLVM < 22 takes;
    # LLVM 22 (llvmlite 0.50) moved it to an attribute and auto-upgrades this form (checked in its printed IR).
    llvm_vec = _llvm_vector(vec)
    i32 = ir.IntType(32)
    mask = ir.VectorType(ir.IntType(1), vec.lanes)
    name = f"llvm.masked.{kind}.{_intrinsic_suffix(vec)}.p0"
    if kind == "load":
        signature = ir.FunctionType(llvm_vec, [pointer_type, i32, mask, llvm_vec])
    else:
        signature = ir.FunctionType(ir.VoidType(), [llvm_vec, pointer_type, i32, mask])
    return cgutils.get_or_insert_function(builder.module, signature, name)


@intrinsic
def load_partial(typingctx, array, offset, count):
    """The first ``count`` elements from ``offset`` in lanes 0 .. count - 1, zeros in the others; reads no
    element past offset + count - 1 (a masked load). 0 <= count <= lanes."""
    _check_array("load_partial", array, offset)
    _require(isinstance(count, types.Integer), f"load_partial() needs an integer count, not {count}")
    vec = vector_type(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        vector_pointer = builder.bitcast(pointer, _llvm_vector(vec).as_pointer())
        function = _masked_intrinsic(builder, "load", vec, vector_pointer.type)
        mask = _lane_mask(builder, vec.lanes, args[2])
        alignment = ir.Constant(ir.IntType(32), array.dtype.bitwidth // 8)
        return builder.call(function, [vector_pointer, alignment, mask, ir.Constant(_llvm_vector(vec), None)])

    return vec(array, offset, count), codegen


@intrinsic
def store_partial(typingctx, array, offset, vector, count):
    """Write lanes 0 .. count - 1 of ``vector`` to elements offset .. offset + count - 1; touches no other
    element (a masked store). 0 <= count <= lanes."""
    _check_array("store_partial", array, offset)
    _require(isinstance(vector, SimdVector) and vector.dtype == array.dtype,
             f"store_partial() needs a vector of the array's dtype {array.dtype}, not {vector}")
    _require(isinstance(count, types.Integer), f"store_partial() needs an integer count, not {count}")
    _require(array.mutable, "store_partial() needs a writable array")

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        vector_pointer = builder.bitcast(pointer, _llvm_vector(vector).as_pointer())
        function = _masked_intrinsic(builder, "store", vector, vector_pointer.type)
        mask = _lane_mask(builder, vector.lanes, args[3])
        alignment = ir.Constant(ir.IntType(32), array.dtype.bitwidth // 8)
        builder.call(function, [args[2], vector_pointer, alignment, mask])
        return context.get_dummy_value()

    return types.none(array, offset, vector, count), codegen


def _same_vectors(name, *vectors):
    _require(all(isinstance(v, SimdVector) for v in vectors) and len(set(vectors)) == 1,
             f"{name}() needs vectors of one type, not {vectors}")
    return vectors[0]


@intrinsic
def fma(typingctx, x, y, z):
    """x * y + z lane by lane: llvm.fma (one rounding, a vfmadd) where the target has FMA, else llvm.fmuladd
    (which LLVM may compute as a multiply and an add: a libm fma call per lane would be far slower)."""
    vec = _same_vectors("fma", x, y, z)
    name = ("llvm.fma." if HAS_FMA else "llvm.fmuladd.") + _intrinsic_suffix(vec)

    def codegen(context, builder, signature, args):
        llvm_vec = _llvm_vector(vec)
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(llvm_vec, [llvm_vec] * 3), name)
        return builder.call(function, list(args))

    return vec(x, y, z), codegen


def _binary(name, emit):
    def typer(typingctx, x, y):
        vec = _same_vectors(name, x, y)

        def codegen(context, builder, signature, args):
            return emit(builder, args[0], args[1])

        return vec(x, y), codegen

    typer.__name__ = name
    typer.__doc__ = f"{name}(x, y) lane by lane on two vectors of one type."
    return intrinsic(typer)


add = _binary("add", lambda builder, x, y: builder.fadd(x, y))
sub = _binary("sub", lambda builder, x, y: builder.fsub(x, y))
mul = _binary("mul", lambda builder, x, y: builder.fmul(x, y))
# x if x > y else y: an ordered compare, so a nan in x gives y (max(nan, 0) = 0, as pointwise.activate's relu).
max = _binary("max", lambda builder, x, y: builder.select(builder.fcmp_ordered(">", x, y), x, y))


@intrinsic
def select_gt(typingctx, x, y, a, b):
    """a where x > y, else b, lane by lane (an ordered compare: b where x or y is nan)."""
    vec = _same_vectors("select_gt", x, y, a, b)

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[2], args[3])

    return vec(x, y, a, b), codegen


@intrinsic
def hsum(typingctx, vector):
    """The sum of the lanes: halves added pairwise (lanes t and t + n/2, then again), a fixed order."""
    _require(isinstance(vector, SimdVector), f"hsum() needs a vector, not {vector}")

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        value = args[0]
        width = vector.lanes
        while width > 1:
            half = width // 2
            low = builder.shuffle_vector(value, value, ir.Constant(ir.VectorType(i32, half), list(range(half))))
            high = builder.shuffle_vector(value, value,
                                          ir.Constant(ir.VectorType(i32, half), list(range(half, width))))
            value = builder.fadd(low, high)
            width = half
        return builder.extract_element(value, ir.Constant(i32, 0))

    return vector.dtype(vector), codegen


@intrinsic
def extract(typingctx, vector, index):
    """Lane ``index`` of ``vector`` (0 <= index < lanes, unchecked)."""
    _require(isinstance(vector, SimdVector), f"extract() needs a vector, not {vector}")
    _require(isinstance(index, types.Integer), f"extract() needs an integer lane index, not {index}")

    def codegen(context, builder, signature, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], signature.args[1], types.intp))

    return vector.dtype(vector, index), codegen


@intrinsic
def load_transposed(typingctx, array, offset, stride):
    """A tuple of ``lanes`` vectors: vector k, lane t = array's element offset + t * stride + k (a lanes x
    lanes block loaded by rows and transposed in registers, for transposing copies). Unchecked, like load."""
    _check_array("load_transposed", array, offset)
    _require(isinstance(stride, types.Integer), f"load_transposed() needs an integer stride, not {stride}")
    vec = vector_type(array.dtype)
    result = types.UniTuple(vec, vec.lanes)

    def codegen(context, builder, signature, args):
        lanes = vec.lanes
        i32 = ir.IntType(32)
        llvm_vec = _llvm_vector(vec)
        array_value = context.make_array(signature.args[0])(context, builder, args[0])
        offset_value = context.cast(builder, args[1], signature.args[1], types.intp)
        stride_value = context.cast(builder, args[2], signature.args[2], types.intp)
        rows = []
        for t in range(lanes):
            start = builder.add(offset_value, builder.mul(stride_value, context.get_constant(types.intp, t)))
            pointer = builder.bitcast(builder.gep(array_value.data, [start]), llvm_vec.as_pointer())
            rows.append(builder.load(pointer, align=array.dtype.bitwidth // 8))
        # Swap the off-diagonal h x h blocks of every 2h x 2h block, h = lanes/2, ..., 1: the transpose.
        half = lanes // 2
        while half >= 1:
            low = [lane if (lane // half) % 2 == 0 else lanes + lane - half for lane in range(lanes)]
            high = [lane + half if (lane // half) % 2 == 0 else lanes + lane for lane in range(lanes)]
            for i in range(lanes):
                if i & half:
                    continue
                a, b = rows[i], rows[i + half]
                rows[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes), low))
                rows[i + half] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes), high))
            half //= 2
        return context.make_tuple(builder, result, rows)

    return result(array, offset, stride), codegen


@intrinsic
def matrix(typingctx, array, offset, n_rows, n_cols):
    """The (n_rows, n_cols) C-contiguous view of the 1-D C-contiguous ``array``'s elements offset ..
    offset + n_rows * n_cols - 1 (read-only where ``array`` is), sharing its memory. Not bounds-checked (the
    memory contract above). What ``array[offset:offset + n_rows * n_cols].reshape((n_rows, n_cols))`` gives, without
    numba's reshape: that compiles a shape normaliser, a C call that tries the no-copy reshape and the raise of
    its failure at every use, which cost about 0.05 s of a driver's cold compile per use, against under 0.01 s
    for this (AMD EPYC Zen 4, numba 0.68); the drivers take a dozen such views of their flat buffers."""
    _require(isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C",
             f"matrix() needs a 1-D C-contiguous array, not {array}")
    _require(all(isinstance(n, types.Integer) for n in (offset, n_rows, n_cols)),
             f"matrix() needs integer offset, n_rows and n_cols, not {offset}, {n_rows}, {n_cols}")
    result = array.copy(ndim=2, layout="C")

    def codegen(context, builder, signature, args):
        source = context.make_array(array)(context, builder, args[0])
        start, rows, columns = (context.cast(builder, value, given, types.intp)
                                for value, given in zip(args[1:], signature.args[1:]))
        view = context.make_array(result)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(array.dtype)))
        context.populate_array(view, data=builder.gep(source.data, [start]), shape=[rows, columns],
                               strides=[builder.mul(columns, itemsize), itemsize], itemsize=itemsize,
                               meminfo=source.meminfo, parent=source.parent)
        return impl_ret_borrowed(context, builder, result, view._getvalue())  # a new reference under NRT

    return result(array, offset, n_rows, n_cols), codegen


@intrinsic
def flat(typingctx, array):
    """The 1-D view of all of the C-contiguous ``array``'s elements, in memory order (read-only where ``array`` is),
    sharing its memory: ``array.reshape(array.size)`` without numba's reshape (see matrix)."""
    _require(isinstance(array, types.Array) and array.layout == "C", f"flat() needs a C-contiguous array, not {array}")
    result = array.copy(ndim=1, layout="C")

    def codegen(context, builder, signature, args):
        source = context.make_array(array)(context, builder, args[0])
        view = context.make_array(result)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(array.dtype)))
        context.populate_array(view, data=source.data, shape=[source.nitems], strides=[itemsize],
                               itemsize=itemsize, meminfo=source.meminfo, parent=source.parent)
        return impl_ret_borrowed(context, builder, result, view._getvalue())

    return result(array), codegen


@intrinsic
def stack_vectors(typingctx, like, count):
    """A 1-D C-contiguous array of ``count`` vectors' worth of elements (count * lanes) of like's element type,
    in the stack frame of the function that calls this (an alloca in its entry block, 64-byte aligned), so
    it lives until that function returns; its contents start undefined. ``count`` must be a compile-time
    constant (a module-level int). No heap allocation and no reference counting: pass it to callees, never
    return it."""
    dtype = _element_type(like)
    _require(dtype is not None, f"stack_vectors() needs a float32/float64 array, scalar or vector, not {like}")
    _require(isinstance(count, types.IntegerLiteral) and count.literal_value > 0,
             f"stack_vectors() needs a positive constant count, not {count}")
    n_elements = count.literal_value * vector_type(dtype).lanes
    array_type = types.Array(dtype, 1, "C")

    def codegen(context, builder, signature, args):
        element = context.get_data_type(dtype)
        with builder.goto_entry_block():
            data = builder.alloca(element, size=ir.Constant(ir.IntType(types.intp.bitwidth), n_elements))
            data.align = 64
        array = context.make_array(array_type)(context, builder)
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(element))
        context.populate_array(array, data=data, shape=[context.get_constant(types.intp, n_elements)],
                               strides=[itemsize], itemsize=itemsize, meminfo=None)
        return array._getvalue()

    return array_type(like, count), codegen
