"""The one place that decides how CPU kernels are compiled (caching, threading).

numba's ``cache=True`` writes compiled code beside the module, falls back to ``~/.cache/numba`` and honours
``NUMBA_CACHE_DIR``; when nothing is writable it raises at decoration time ("no locator available"), which
would make ``import fastbp`` fail on a read-only install. We try caching and fall back to none.
Set ``FASTBP_CACHE=0`` to turn caching off. Unlike numba's own, fastbp's cache entries follow edits of the
helpers they inline or call in other files (numba #10776) and are safe to write from several processes at
once (numba #10128): see _RegisteringCache.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import warnings
from types import ModuleType as types_module

import llvmlite.binding as llvm
from numba import njit, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, lower_builtin, type_callable

from . import _threads

_threads.make_tbb_findable()  # before numba picks its threading layer (see fastbp._threads)

CACHE_ENABLED = os.environ.get("FASTBP_CACHE", "1").lower() not in ("0", "false", "no", "off")


def cpu_jit(parallel=False, cache=True, **options):
    """Decorator: ``numba.njit`` with fastbp's defaults, lazily compiled (no signature), cached when possible.

    ``parallel=True`` only on the functions that hold a ``prange`` loop. A cached serial function may call a
    parallel one since numba 0.63 (numba #8578, fixed by PR #9950; before it, loading such a caller from the
    cache segfaulted, and fastbp compiled every function parallel): hence ``numba>=0.63``. numba's parfor
    passes on a function with nothing to parallelise only cost compile time (19 of the fused narrow kernel's
    54 s cold compile, when it was compiled parallel). ``cache=False`` keeps a function off the disk cache
    (the product engine while FASTBP_SIMD_BITS overrides its vector width: see fastbp.kernels.simd).
    """
    def decorate(func):
        if cache and CACHE_ENABLED:
            try:
                dispatcher = njit(cache=True, parallel=parallel, **options)(func)
            except RuntimeError as error:  # "cannot cache function ...: no locator available"
                warnings.warn(
                    f"fastbp: numba cannot cache {func.__qualname__} ({error}); compiling without a disk cache. "
                    "Set NUMBA_CACHE_DIR to a writable folder to keep compiled kernels between runs.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                dispatcher._cache = _RegisteringCache(dispatcher._cache, func)
                return dispatcher
        return njit(cache=False, parallel=parallel, **options)(func)

    return decorate


# --- separately compiled functions ------------------------------------------------------------------------------
# numba compiles every function into a library of its own and LINKS a callee's whole library into each caller's
# module, where LLVM optimises it and generates its machine code again. A call tree k levels deep therefore
# compiles its leaves k times: the product engine's worker, called from the parallel driver (and its outlined
# parallel body), the layer kernels, the step driver and the epoch driver, was optimised and code-generated
# six times in a cold fit (AMD EPYC Zen 4: the driver alone took 4.5 s on top of the 6 s worker, 1.7 s with the
# worker called as below). ``separately_compiled`` compiles a function once per dtype and lets other compiled
# functions call it through a stable symbol instead (an LLVM declaration resolved when their machine code is
# loaded, the way numba itself calls its threading layer's get_num_threads), so each piece of code is
# optimised and generated once. It is for large functions called at coarse grain (a whole product, a batch's
# loss): LLVM cannot inline across such a call.
#
# The symbol must be registered before a caller's machine code is loaded, or the loader has nothing to bind the
# call to (a null address: a crash). A caller compiled in this process registers it while being typed; a caller
# loaded from the disk cache does so through _RegisteringCache, which every cpu_jit function carries: before
# loading, it registers the separately compiled functions the caller's code refers to (found by name among its
# globals). Only fastbp's own drivers call these; the public kernels (fastbp.kernels.cpu, gemm's
# dense_forward ...) link their callees as numba does, so a user's cached numba code never depends on a symbol.
class SeparatelyCompiled:
    """A compiled function that other compiled functions call by symbol, compiled once per dtype.

    ``signature_for(dtype)`` gives its one signature for a numba float type (every array layout and integer
    type fixed): a call from compiled code must have those types (literal integers are converted), so that
    the symbol a cached caller needs can always be rebuilt from the dtype alone. Called from Python, it is
    the plain dispatcher.
    """

    def __init__(self, dispatcher, signature_for):
        self.dispatcher = dispatcher
        self.signature_for = signature_for
        self.py_func = dispatcher.py_func
        self.__name__ = dispatcher.py_func.__name__
        self.__qualname__ = dispatcher.py_func.__qualname__
        self.__doc__ = dispatcher.py_func.__doc__
        self._results = {}  # dtype -> numba's compile result, once its symbol is registered
        _register_call_typing(self)

    def __call__(self, *args):
        return self.dispatcher(*args)

    def __repr__(self):
        return f"<separately compiled {self.__module__}.{self.__qualname__}>"

    def symbol(self, dtype) -> str:
        return f"fastbp.{self.py_func.__module__}.{self.__qualname__}.{dtype}"

    def register(self, dtype):
        """Compile (or load from the disk cache) the ``dtype`` version and publish its address; idempotent."""
        if dtype not in self._results:
            signature = tuple(self.signature_for(dtype))
            self.dispatcher.compile(signature)
            result = self.dispatcher.overloads[signature]
            address = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
            llvm.add_symbol(self.symbol(dtype), address)
            self._results[dtype] = result
        return self._results[dtype]

    def match(self, argtypes):
        """(dtype, signature) of a call from compiled code with ``argtypes``; a TypingError unless they are the
        function's signature for the dtype of their first float array."""
        dtype = _first_float_dtype(argtypes)
        expected = tuple(self.signature_for(dtype)) if dtype is not None else None
        given = tuple(types.unliteral(t) for t in argtypes)
        if expected is None or len(given) != len(expected) or any(
                not _converts(g, e) for g, e in zip(given, expected)):
            raise errors.TypingError(f"{self.__qualname__} is called by symbol and takes exactly {expected}; got "
                                     f"{given}")
        return dtype, expected


def separately_compiled(signature_for):
    """Decorator (above a cpu_jit one): see SeparatelyCompiled."""
    return lambda dispatcher: SeparatelyCompiled(dispatcher, signature_for)


def _first_float_dtype(argtypes):
    for t in argtypes:
        if isinstance(t, types.Array) and t.dtype in (types.float32, types.float64):
            return t.dtype
    return None


def _converts(given, expected):
    if isinstance(expected, types.Array):
        return given == expected
    if isinstance(expected, types.BaseTuple):
        return isinstance(given, types.BaseTuple) and len(given) == len(expected) and all(
            _converts(types.unliteral(g), e) for g, e in zip(given, expected))
    return isinstance(given, (types.Integer, types.Float, types.Boolean)) and isinstance(
        expected, (types.Integer, types.Float, types.Boolean))


def _register_call_typing(function):
    def typer(context):
        def call_type(*args):
            dtype, expected = function.match(args)
            return function.register(dtype).signature.return_type(*args)

        call_type.pysig = inspect.signature(function.py_func)  # fixed arity (not call_type's *args)
        return call_type

    type_callable(function)(typer)

    @lower_builtin(function, types.VarArg(types.Any))
    def lower(context, builder, signature, args):
        dtype, expected = function.match(signature.args)
        result = function.register(dtype)
        values = [context.cast(builder, value, given, wanted)
                  for value, given, wanted in zip(args, signature.args, expected)]
        restype = result.signature.return_type
        callee = cgutils.get_or_insert_function(
            builder.module, context.call_conv.get_function_type(restype, expected), function.symbol(dtype))
        status, value = context.call_conv.call_function(builder, callee, restype, expected, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return value


class _RegisteringCache:
    """numba's disk cache of one cpu_jit function, with two additions; everything else is numba's.

    - Before it loads machine code, it registers the separately compiled functions that the function's code
      calls (see above).
    - Its entries are keyed by the code of everything the function's machine code holds or calls, not only by
      its own bytecode and file: numba's key would keep serving a caller compiled against an older callee (an
      edited helper, a changed tile shape; numba #10776), which with a symbol call means a call into a function
      whose name or arguments have changed. The fingerprint (_fingerprint) covers the compiled and inlined
      functions its code names, transitively, the intrinsics, and the module-level numbers they read.
    - Each entry's machine code goes to a file named after its key (_save_by_key), not after a counter: two
      processes compiling different signatures or closure values of one function into one cache at once
      (joblib workers, MPI ranks) both took the first free number, and one index could then name the other's
      machine code: a later process silently ran a kernel compiled for another configuration (numba #10128;
      seen here with the fused narrow kernel, tanh weights computed by a sigmoid kernel).
    """

    def __init__(self, cache, func):
        self._cache = cache
        self._func = func
        self._dependencies = None
        index_key = cache._index_key
        cache._index_key = lambda sig, codegen: index_key(sig, codegen) + (self.dependencies(),)
        cache_file = getattr(cache, "_cache_file", None)
        if cache_file is not None and hasattr(cache_file, "_data_name_pattern"):
            cache_file.save = lambda key, data: _save_by_key(cache_file, key, data)

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def dependencies(self) -> str:
        if self._dependencies is None:  # computed at first use: the module's globals all exist by then
            self._dependencies = _fingerprint(self._func)
        return self._dependencies

    def load_overload(self, sig, target_context):
        dtype = _first_float_dtype(sig.args if hasattr(sig, "args") else sig)
        if dtype is not None:
            for callee in _separate_callees(self._func):
                callee.register(dtype)
        return self._cache.load_overload(sig, target_context)


def _save_by_key(cache_file, key, data):
    """numba's IndexDataCacheFile.save, with the data file named after a hash of the key: whatever the
    interleaving of processes saving into one cache, an index entry can only name the file of its own key (an
    index written over by another process loses entries: those recompile). Data files of keys that no longer
    occur (after an edit or an upgrade) stay behind until the cache directory is cleared."""
    overloads = cache_file._load_index()
    name = overloads.get(key)
    if name is None:
        digest = hashlib.sha256(pickle.dumps(key, protocol=4)).hexdigest()[:20]
        name = cache_file._data_name_pattern.replace("{number:d}", digest)
        overloads[key] = name
        cache_file._save_index(overloads)
    cache_file._save_data(name, data)


def _fingerprint(func) -> str:
    """sha256 over the code that func's machine code is built from, besides func itself: the bytecode and
    constants of every Python function its code reaches through the globals it names (numba dispatchers, inline
    helpers, separately compiled functions, intrinsics' definitions), their module-level numbers (numba
    freezes globals into the code), and each separately compiled function's symbol."""
    digest = hashlib.sha256()
    seen = set()
    pending = [func]
    while pending:
        function = pending.pop()
        if function in seen:
            continue
        seen.add(function)
        code = function.__code__
        digest.update(function.__module__.encode() + b"." + function.__qualname__.encode())
        digest.update(_code_bytes(code))
        names = sorted(_all_names(code))  # sorted: a set's order changes with every process's string hashing
        scope = function.__globals__
        values = [(name, scope.get(name)) for name in names]
        values += [(f"{module.__name__}.{name}", getattr(module, name, None)) for _, module in list(values)
                   if isinstance(module, types_module) for name in names]
        for name, value in values:
            if isinstance(value, SeparatelyCompiled):
                digest.update(value.symbol("").encode())
                pending.append(value.py_func)
            elif hasattr(value, "py_func") and hasattr(value, "overloads"):  # a numba dispatcher
                pending.append(value.py_func)
            elif hasattr(value, "_defn") and callable(value._defn):  # a numba intrinsic
                pending.append(value._defn)
            elif isinstance(value, (bool, int, float, str)):
                digest.update(f"{name}={value!r}".encode())
    return digest.hexdigest()


def _code_bytes(code) -> bytes:
    # A code object's bytecode and constants, nested code objects (closures, lambdas) included.
    parts = [code.co_code]
    for constant in code.co_consts:
        if hasattr(constant, "co_code"):
            parts.append(_code_bytes(constant))
        elif isinstance(constant, frozenset):  # its repr's order depends on the process's string hashing
            parts.append(repr(sorted(map(repr, constant))).encode())
        else:
            parts.append(repr(constant).encode())
    return b"\x00".join(parts)


def _all_names(code) -> set:
    # The global and attribute names a code object and its nested code objects use.
    names = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_code"):
            names |= _all_names(constant)
    return names


def _separate_callees(func, seen=None):
    """The SeparatelyCompiled functions whose symbols func's machine code needs: those its code names (globals,
    and attributes of the modules it names) and, through the compiled functions it names (inlined or linked:
    their code becomes func's), those theirs need. A SeparatelyCompiled callee's own needs are registered when
    it is loaded, so the walk stops there."""
    seen = set() if seen is None else seen
    if func in seen:
        return []
    seen.add(func)
    names = func.__code__.co_names
    values = [func.__globals__.get(name) for name in names]
    values += [getattr(module, name, None) for module in values if isinstance(module, types_module) for name in names]
    found = []
    for value in values:
        if isinstance(value, SeparatelyCompiled):
            found.append(value)
        elif hasattr(value, "py_func") and hasattr(value, "overloads"):  # a numba dispatcher
            found.extend(_separate_callees(value.py_func, seen))
    return found


# Shared helpers that both targets compile: inlined into every caller (see shared toolchain notes: only
# inline helpers compile to PTX without a GPU), so they are never compiled or cached on their own.
inline = njit(inline="always")


# --- 512-bit vectors where fastbp asks for them --------------------------------------------------------------
# LLVM compiles for AVX-512 CPUs of the Skylake-server line (Skylake-X to Emerald Rapids) with the tuning flag
# prefer-256-bit: its vectorisers stop at 256-bit ymm registers even though zmm is available (the choice clang
# exposes as -mprefer-vector-width=; LLVM's X86.td lists TuningPrefer256Bit for those CPUs, a guard against
# the clock drop of 512-bit code on the early ones). For fastbp's product kernels, which are FMA-bound, that
# caps the peak: measured here (Emerald Rapids, float32, one thread, 512x1024x1024, medians of 5 alternating
# rounds) the 6x4 NT tile ran at 60 GFLOP/s with ymm and 76 with zmm, against OpenBLAS's 90; with 2-D
# parallel tasks the product on two threads went from about 110 to 145-190 GFLOP/s. A function attribute is the
# per-function form of that choice, so it changes fastbp's own kernels only, never the user's numba code
# (numba's process-wide alternative, NUMBA_CPU_FEATURES, would). On CPUs without AVX-512 the attribute asks for
# nothing the target has, and LLVM keeps its usual widths.
WIDE_VECTORS_ATTRIBUTE = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Call first thing in a CPU kernel: LLVM may vectorise that function with 512-bit registers.

    Only the function that makes the call gets the attribute (numba compiles each function into its own
    module, vectorised before linking), so call it in each kernel whose loops should use zmm registers.
    A no-op where llvmlite cannot carry the attribute (it keeps function attributes in a set of known names:
    the string attribute is added to the set directly)."""
    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, WIDE_VECTORS_ATTRIBUTE)
        except TypeError:  # a future llvmlite whose attributes are not a set: keep the default widths
            pass
        return context.get_dummy_value()

    return types.none(), codegen
