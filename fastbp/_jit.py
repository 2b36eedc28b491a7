"""The one place that decides how CPU kernels are compiled (caching, threading).

numba's ``cache=True`` writes compiled code beside the module, falls back to ``~/.cache/numba`` and honours
``NUMBA_CACHE_DIR``; when nothing is writable it raises at decoration time ("no locator available"), which
would make ``import fastbp`` fail on a read-only install. We try caching and fall back to none.
Set ``FASTBP_CACHE=0`` to turn caching off. Unlike numba's own, fastbp's cache entries follow edits of the
helpers they inline or call in other files (numba #10776) and are safe to write from several processes at
once (numba #10128): see _RegisteringCache.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import inspect
import os
import pickle
import time
import warnings
import weakref
from types import FunctionType as python_function
from types import ModuleType as types_module

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, errors
from numba.core.runtime import nrt
from numba.extending import intrinsic, lower_builtin, type_callable

from . import _standby, _threads

_threads.make_tbb_findable()  # before numba picks its threading layer (see fastbp._threads)

CACHE_ENABLED = _standby.cache_enabled()

# The floating-point freedoms fastbp's CPU kernels compile with (``cpu_jit(**FAST)``): reassociation lets LLVM
# split a dot product into vector partial sums (without it no reduction loop vectorises: 8 GFLOP/s instead of
# 50 here), contraction makes FMAs. Not "nnan"/"ninf": the drivers test losses with np.isfinite, which those
# flags would let LLVM fold to True. The explicit vector operations of fastbp.kernels.simd carry no flags.
FAST_MATH = {"reassoc", "contract", "nsz"}
# error_model="numpy": a division by zero gives inf/nan instead of raising ZeroDivisionError. The check
# numba's default ("python") puts before every division is a branch that stops loops from vectorising
# (sigmoid's 1 / (1 + e): 10 ns per element instead of about 1).
FAST = dict(fastmath=FAST_MATH, error_model="numpy")


def cpu_jit(parallel=False, cache=True, nrt=True, **options):
    """Decorator: ``numba.njit`` with fastbp's defaults, lazily compiled (no signature), cached when possible.

    ``parallel=True`` only on the functions that hold a ``prange`` loop. A cached serial function may call a
    parallel one since numba 0.63 (numba #8578, fixed by PR #9950; before it, loading such a caller from the
    cache segfaulted, and fastbp compiled every function parallel): hence ``numba>=0.63``. numba's parfor
    passes on a function with nothing to parallelise only cost compile time (19 of the fused narrow kernel's
    54 s cold compile, when it was compiled parallel). ``cache=False`` keeps a function off the disk cache
    (the product engine while FASTBP_SIMD_BITS overrides its vector width: see fastbp.kernels.simd).

    ``nrt=False`` compiles a function that allocates nothing without numba's reference counting (its ``_nrt``
    option): numba then emits no reference-count updates for the arrays and views it handles, code that LLVM
    otherwise has to build, optimise and mostly prune again. The epoch driver's cold compile went from 1.57 to
    1.14 s, the batch gradient's from 1.08 to 0.76 s (AMD EPYC Zen 4, numba's pipeline times). Its arrays are
    borrowed from its caller, which keeps them alive for the call (every fastbp driver is called from Python,
    which holds them); an allocation inside it fails to compile ("NRT required but not enabled").
    """
    if not nrt:
        options["_nrt"] = False

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
# worker called as below). ``SeparatelyCompiled`` compiles a function once per dtype and lets other compiled
# functions call it through a slot instead: a pointer-sized global with a stable symbol, registered with LLVM's
# loader when first named, which holds the function's address once it is compiled (or loaded from the disk
# cache). Each piece of code is then optimised and generated once, and a caller's machine code does not need
# its callee's: the two can be compiled in any order, in different processes (see "Compile sessions" below).
# It is for large functions called at coarse grain (a whole product, a batch's loss): LLVM cannot inline
# across such a call, and the load of the slot costs nothing measurable there.
#
# The slot must be filled before a caller runs. Outside a compile session, a caller compiled in this process
# fills it while being typed; a caller loaded from the disk cache does so through _RegisteringCache, which
# every cpu_jit function carries: before loading, it fills the slots of the separately compiled functions the
# caller's code refers to (found by name among its globals). Code outside fastbp that links a caller (a user's
# njit function calling the vocabulary, fastbp.kernels.cpu.dense_forward ..., which calls the product engine by
# symbol) is cached by numba alone: each call by symbol also leaves a _FillOnLoad in its library's reload_init,
# which numba runs before it loads the machine code and which any library linking it inherits, and which refuses
# code compiled against another declaration of the callee. Every slot is known to LLVM's loader from the start
# (declared empty when its object is made), so a call through an empty slot raises RuntimeError instead of
# jumping to address 0.
#
# Optional slots. A function made with ``optional=True`` is one its callers can do without: they test its slot
# with ``is_compiled(function, array, work)`` where they would call it and call it only where that is true, doing
# the same work another way otherwise (the product engine's tiled worker: its callers run the plain product
# until it is there; its parallel region: they run the product on the calling thread). A test that finds the slot
# empty adds ``work`` to a count beside the slot; the function is wanted once that reaches its ``wanted_after``.
# A compile session leaves it out: at the session's end it is filled from the disk cache where the cache has it;
# else a helper process compiles it after everything else on its list, and the process loads it at a later call
# of a driver (Entry looks for it); without a helper (one CPU, FASTBP_COMPILE_PROCESSES=1) it is compiled in this
# process at the first driver call after it became wanted, so that a process whose products are all small never
# compiles the parallel region, and one that does little product work never compiles the tiled worker.
# fastbp.precompile (one_compile_process) and calls outside compile sessions compile it at once, as any other.
#
# Slots filled on request. A function made with ``on_request=True`` is one that only some of its callers' run-time
# arguments reach (the product engine's sigmoid and tanh, which a relu network never calls): compile sessions and
# helpers leave its slot empty, and whoever makes calls that reach it fills the slot first (:func:`fill_now`: the
# CPU backend, for networks with those activations, whose helper compiles it first). Calls outside compile
# sessions compile it at once, as any other; a call through its empty slot raises RuntimeError, as any slot's.
# "module.qualname" -> the SeparatelyCompiled whose slots carry that name. Two live objects of one name would share
# their slots' symbols: LLVM keeps the address declared last, so code linked afterwards would read the other
# object's slot, never filled (found as a flaky test: three test objects wrapped one function). Weak: an object
# that is dropped (a test's) frees its name.
_slot_owners = weakref.WeakValueDictionary()


class SeparatelyCompiled:
    """A compiled function that other compiled functions call through a slot, compiled once per dtype.

    ``signature_for(dtype)`` gives its argument types for a numba float type (every array layout and integer
    type fixed), and ``returns`` its return type (declared, so that a caller can be compiled before it; checked
    when it is compiled): a call from compiled code must have those types (literal integers are converted, and a
    writable array goes where a read-only one is declared), so that the slot a cached caller needs can always be
    rebuilt from the dtype alone. Called from Python, it is the plain dispatcher, or, for a function compiled with
    numba's ``no_cpython_wrapper=True`` (one only compiled code calls: no Python entry point to build, about
    0.1 s less of a cold compile for the batch gradient and the product, AMD EPYC Zen 4), a small compiled
    function that calls it by symbol (built at the first call from Python: tests, benchmarks). ``optional``:
    callers test :func:`is_compiled` before calling it and do without it until then (see "Optional slots"
    above); without a helper process it is compiled once the work its callers did without it adds up to
    ``wanted_after``. ``on_request``: filled by whoever calls it, not by compile sessions (see "Slots filled on
    request" above). One object per function: the slots are named after the function's module and name, and a
    second live object of that name is refused (ValueError).
    """

    def __init__(self, dispatcher, signature_for, returns=types.none, optional=False, wanted_after=1,
                 on_request=False):
        if optional and on_request:
            raise ValueError("a SeparatelyCompiled function is optional or filled on request, not both")
        self.dispatcher = dispatcher
        self.signature_for = signature_for
        self.returns = returns
        self.optional = optional
        self.on_request = on_request
        self.wanted_after = wanted_after
        self.py_func = dispatcher.py_func
        self.__name__ = dispatcher.py_func.__name__
        self.__qualname__ = dispatcher.py_func.__qualname__
        self.__doc__ = dispatcher.py_func.__doc__
        self._slots = {}  # dtype -> ctypes.c_void_p whose address is the slot's symbol
        self._results = {}  # dtype -> numba's compile result, once its address is in the slot
        self._wanted = {}  # dtype -> ctypes.c_int64 to which is_compiled adds its work on finding the slot empty
        self._from_python = None  # see __call__
        self._reference = None  # see reference()
        name = f"{self.py_func.__module__}.{self.__qualname__}"
        owner = _slot_owners.get(name)
        if owner is not None:
            raise ValueError(f"{name} is already compiled separately ({owner!r}): a slot's symbol is named after its "
                             f"function's module and name, so a second SeparatelyCompiled of that name would take "
                             f"the symbols over from code linked to the first; give it a function of its own")
        _slot_owners[name] = self
        _register_call_typing(self)
        # Every slot is known to LLVM's loader from the start, empty: machine code that calls one before anything
        # filled it (a cache entry loaded without its reload_init) then raises RuntimeError at the call, where an
        # unknown symbol would be bound to address 0 and crash the process.
        for dtype in (types.float32, types.float64):
            self.declare(dtype)

    def __call__(self, *args):
        if self.dispatcher.targetoptions.get("no_cpython_wrapper"):
            if self._from_python is None:
                self._from_python = _calling_by_symbol(self)
            return self._from_python(*args)
        return self.dispatcher(*args)

    def __repr__(self):
        return f"<separately compiled {self.py_func.__module__}.{self.__qualname__}>"

    def __reduce__(self):
        # by reference, as the module-level object it is (its slots hold this process's addresses): a pickled
        # trainer's fused kernel names some in its globals
        module, attribute = _module_attribute(self).split(":")
        return _import_attribute, (module, attribute)

    def reference(self):
        """'module:attribute' under which this object can be imported in another process, or None where it is not a
        module global (a test's)."""
        if self._reference is None:
            try:
                self._reference = _module_attribute(self)
            except (KeyError, LookupError):
                self._reference = ""
        return self._reference or None

    def declared(self, dtype) -> str:
        """The ``dtype`` version's declared argument and return types, as text."""
        return f"{tuple(self.signature_for(dtype))} -> {self.returns}"

    def symbol(self, dtype) -> str:
        """The name of the ``dtype`` version's slot."""
        return f"fastbp.slot.{self.py_func.__module__}.{self.__qualname__}.{dtype}"

    def declare(self, dtype):
        """Make the ``dtype`` version's slot known to LLVM's loader (empty until :meth:`fill`); idempotent."""
        if dtype not in self._slots:
            slot = ctypes.c_void_p(0)
            llvm.add_symbol(self.symbol(dtype), ctypes.addressof(slot))
            self._slots[dtype] = slot
            if self.optional:
                wanted = ctypes.c_int64(0)
                llvm.add_symbol(self.wanted_symbol(dtype), ctypes.addressof(wanted))
                self._wanted[dtype] = wanted

    def wanted_symbol(self, dtype) -> str:
        """The name of the count beside an optional function's ``dtype`` slot (see is_compiled)."""
        return self.symbol(dtype) + ".wanted"

    def wanted(self, dtype) -> bool:
        """Whether the work that compiled code did without this optional function (finding its ``dtype`` slot
        empty) adds up to its ``wanted_after``."""
        cell = self._wanted.get(dtype)
        return cell is not None and cell.value >= self.wanted_after

    def register(self, dtype):
        """Declare the ``dtype`` version and fill its slot now, or, inside a compile session, when the session
        ends (an optional one: where the session's end says, see _fill_optional; one filled on request: never);
        idempotent."""
        self.declare(dtype)
        if dtype not in self._results:
            if _session is not None:
                _session.defer(self, dtype)
            elif not ((self.optional or self.on_request) and os.environ.get(WORKER_VARIABLE)):
                self.fill(dtype)  # (a helper compiles those only from its list)

    def fill(self, dtype):
        """Compile (or load from the disk cache) the ``dtype`` version and put its address in the slot."""
        self.declare(dtype)
        if dtype not in self._results:
            signature = tuple(self.signature_for(dtype))
            self.dispatcher.compile(signature)
            result = self.dispatcher.overloads[signature]
            if result.signature.return_type != self.returns:
                raise TypeError(f"{self.__qualname__} returns {result.signature.return_type}, but is declared to "
                                f"return {self.returns} (SeparatelyCompiled's returns=)")
            self._slots[dtype].value = result.library.get_pointer_to_function(result.fndesc.llvm_func_name)
            self._results[dtype] = result

    def in_disk_cache(self, dtype) -> bool:
        """Whether numba's disk cache holds the ``dtype`` version for this machine and this code (an index
        lookup: nothing is loaded)."""
        return _in_disk_cache(self.dispatcher, tuple(self.signature_for(dtype)))

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


def _calling_by_symbol(function):
    """A compiled function of function's parameters that calls it by symbol and returns what it returns: its
    entry point from Python when it has no CPython wrapper (see SeparatelyCompiled). Not cached (its source is
    built here): a test's or a benchmark's first call compiles it."""
    parameters = ", ".join(inspect.signature(function.py_func).parameters)
    scope = {"function": function}
    exec(f"def from_python({parameters}):\n    return function({parameters})\n", scope)  # noqa: S102
    return njit(cache=False)(scope["from_python"])


def _in_disk_cache(dispatcher, signature) -> bool:
    cache = getattr(dispatcher, "_cache", None)
    if not isinstance(cache, _RegisteringCache):
        return False
    try:
        key = cache._index_key(signature, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001 - a cache that cannot be read is a miss
        return False


class DriverVersion:
    """One version (its argument types, given the dtype) of a driver that a backend calls through an Entry, which
    a helper process can compile into the disk cache before the first call needs it (prefetch's ``then``): a
    trainer's predict and evaluation versions of forward_pass, compiled beside its fit instead of after it. A
    first call that finds it in the helper's list waits for it, or takes it if the helper has not started it.
    ``signature_for(dtype)`` must give exactly the types the backend passes (a test checks them): otherwise the
    helper compiles a version that nothing calls. Referred to by 'module:attribute', as a SeparatelyCompiled."""

    def __init__(self, dispatcher, signature_for, name):
        self.dispatcher = dispatcher
        self.signature_for = signature_for
        self.py_func = dispatcher.py_func
        self.__qualname__ = f"{self.py_func.__qualname__}.{name}"
        self._results = {}  # dtype -> True once compiled or loaded in this process
        _versions.setdefault(dispatcher, []).append(self)

    def __repr__(self):
        return f"<driver version {self.py_func.__module__}.{self.__qualname__}>"

    def symbol(self, dtype) -> str:
        """Its name in a helper's claim folder."""
        return f"fastbp.version.{self.py_func.__module__}.{self.__qualname__}.{dtype}"

    def fill(self, dtype):
        """Compile (or load from the disk cache) the ``dtype`` version."""
        if dtype not in self._results:
            self.dispatcher.compile(tuple(self.signature_for(dtype)))
            self._results[dtype] = True

    def in_disk_cache(self, dtype) -> bool:
        return _in_disk_cache(self.dispatcher, tuple(self.signature_for(dtype)))


_versions = {}  # dispatcher -> its DriverVersions


def _version_of(dispatcher, signature, dtype):
    """The DriverVersion of ``dispatcher`` whose types are ``signature``, or None."""
    for version in _versions.get(dispatcher, ()):
        if tuple(version.signature_for(dtype)) == tuple(signature):
            return version
    return None


def separately_compiled(signature_for, returns=types.none):
    """Decorator (above a cpu_jit one): see SeparatelyCompiled."""
    return lambda dispatcher: SeparatelyCompiled(dispatcher, signature_for, returns)


def _first_float_dtype(argtypes):
    for t in argtypes:
        if isinstance(t, types.Array) and t.dtype in (types.float32, types.float64):
            return t.dtype
    return None


def _converts(given, expected):
    if isinstance(expected, types.Array):  # exactly, or a writable array where a read-only one is declared
        return given == expected or (isinstance(given, types.Array) and given.copy(readonly=True) == expected)
    if isinstance(expected, types.BaseTuple):
        return isinstance(given, types.BaseTuple) and len(given) == len(expected) and all(
            _converts(types.unliteral(g), e) for g, e in zip(given, expected))
    return isinstance(given, (types.Integer, types.Float, types.Boolean)) and isinstance(
        expected, (types.Integer, types.Float, types.Boolean))


def _register_call_typing(function):
    def typer(context):
        def call_type(*args):
            dtype, expected = function.match(args)
            function.register(dtype)
            return function.returns(*args)

        call_type.pysig = inspect.signature(function.py_func)  # fixed arity (not call_type's *args)
        return call_type

    type_callable(function)(typer)

    @lower_builtin(function, types.VarArg(types.Any))
    def lower(context, builder, signature, args):
        dtype, expected = function.match(signature.args)
        function.register(dtype)
        values = [context.cast(builder, value, given, wanted)
                  for value, given, wanted in zip(args, signature.args, expected)]
        restype = function.returns
        _fill_on_load(context, function, dtype)
        address = builder.load(_slot_variable(builder, function.symbol(dtype)))
        with cgutils.if_unlikely(builder, cgutils.is_null(builder, address)):
            context.call_conv.return_user_exc(builder, RuntimeError, (
                f"fastbp: {function.__qualname__} ({dtype}) was called before it was compiled",))
        callee = builder.bitcast(address, context.call_conv.get_function_type(restype, expected).as_pointer())
        status, value = context.call_conv.call_function(builder, callee, restype, expected, values)
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return value


_SLOT_TYPE = ir.IntType(8).as_pointer()  # a slot holds a function's address
_WANTED_TYPE = ir.IntType(64)  # an optional function's count of work done without it (see is_compiled)


class _FillOnLoad:
    """Registers the ``dtype_name`` version of the separately compiled function ``reference`` ('module:attribute'):
    fills its slot, or defers that in a compile session (SeparatelyCompiled.register). A call by symbol puts one
    into the reload_init of the library being compiled: numba runs those before it loads the library's machine code
    from its disk cache (numba.core.compiler, CompileResult._rebuild), and a library that links another inherits
    them (numba.core.codegen: numba's parallel code uses this to start the threads its code calls into). So code
    cached outside fastbp that links a public kernel (a user's ``@njit(cache=True)`` function that calls
    fastbp.kernels.cpu.dense_forward) finds the slots that kernel calls filled in a new process, as fastbp's own
    cached functions do through _RegisteringCache. Picklable (numba pickles reload_init with the machine code)."""

    def __init__(self, reference: str, dtype_name: str, declared: str):
        self.reference = reference
        self.dtype_name = dtype_name
        self.declared = declared  # the callee's declared types when the code was compiled (see __call__)

    def __call__(self):
        try:
            function = _import_attribute(*self.reference.split(":"))
            declared = function.declared(getattr(types, self.dtype_name))
        except (ImportError, AttributeError):  # gone or renamed since the code was compiled
            function, declared = None, "nothing (it is not there)"
        if declared != getattr(self, "declared", None):  # (one unpickled from an older fastbp may lack it)
            # machine code cached by an older fastbp (a user's own cache: numba keys it by the user's file only)
            # would pass its arguments as the callee was declared then
            raise RuntimeError(f"fastbp: this cached code calls {self.reference} declared as "
                               f"{getattr(self, 'declared', 'before declarations were recorded')}, but "
                               f"this fastbp declares {declared}: it was compiled with another version of fastbp. "
                               f"Clear numba's cache (the __pycache__ folders beside your code, or NUMBA_CACHE_DIR) "
                               f"and run again.")
        function.register(getattr(types, self.dtype_name))

    def _key(self):
        return self.reference, self.dtype_name, getattr(self, "declared", None)

    def __eq__(self, other):
        return isinstance(other, _FillOnLoad) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"_FillOnLoad({self.reference!r}, {self.dtype_name!r}, {getattr(self, 'declared', None)!r})"


def _fill_on_load(context, function, dtype):
    # A _FillOnLoad for ``function``'s ``dtype`` version into the reload_init of the library being compiled (none
    # for an object that is not a module global: another process could not import it)
    reference = function.reference()
    if reference is not None:
        context.active_code_library._reload_init.add(_FillOnLoad(reference, str(dtype), function.declared(dtype)))


def _slot_variable(builder, name, kind=_SLOT_TYPE):
    # The slot ``name`` (or, kind _WANTED_TYPE, an optional function's wanted count) in the module being built: a
    # declaration, which the loader binds to the address registered under that name (see SeparatelyCompiled).
    slot = builder.module.globals.get(name)
    if slot is None:
        slot = ir.GlobalVariable(builder.module, kind, name)
    return slot


@intrinsic
def is_compiled(typingctx, function, like, work):
    """In compiled code: whether the optional separately compiled ``function`` (a global) has its version for the
    dtype of the array ``like`` in its slot, so that it may be called; where not, it adds ``work`` (an integer:
    what the caller does without it, in any unit the function's wanted_after counts) to the function's wanted
    count (see "Optional slots"). Test it where the function would be called, not ahead."""
    target = getattr(function, "typing_key", None)
    if not (isinstance(target, SeparatelyCompiled) and target.optional and isinstance(like, types.Array)
            and isinstance(work, types.Integer)):
        raise errors.TypingError(f"is_compiled takes an optional SeparatelyCompiled function, an array and an "
                                 f"integer; got {function}, {like}, {work}")
    dtype = like.dtype
    target.register(dtype)

    def codegen(context, builder, signature, args):
        filled = cgutils.is_not_null(builder, builder.load(_slot_variable(builder, target.symbol(dtype))))
        with builder.if_then(builder.not_(filled), likely=False):
            count = _slot_variable(builder, target.wanted_symbol(dtype), _WANTED_TYPE)
            added = context.cast(builder, args[2], work, types.int64)
            builder.store(builder.add(builder.load(count), added), count)
        return filled

    return types.boolean(function, like, work), codegen


@intrinsic
def fill_on_use(typingctx, function, like):
    """In compiled code: the separately compiled ``function`` (a global) in its slot, for the dtype of the array
    ``like``, wherever this code runs: registered when the caller is typed, and again before the caller's cached
    machine code (or that of code linking it) is loaded (_FillOnLoad). For code outside fastbp's drivers that
    reaches an optional function through another one: the vocabulary kernels, whose product runs its plain loops
    while the tiled worker is not in its slot, and which a user may call long after a trainer's compile session
    left that slot to a helper (see "Optional slots"). Generates no code."""
    target = getattr(function, "typing_key", None)
    if not (isinstance(target, SeparatelyCompiled) and isinstance(like, types.Array)):
        raise errors.TypingError(f"fill_on_use takes a SeparatelyCompiled function and an array; got {function}, "
                                 f"{like}")
    dtype = like.dtype
    target.register(dtype)

    def codegen(context, builder, signature, args):
        _fill_on_load(context, target, dtype)
        return context.get_dummy_value()

    return types.none(function, like), codegen


class _RegisteringCache:
    """numba's disk cache of one cpu_jit function, with two additions; everything else is numba's.

    - Once it has loaded machine code, it registers the separately compiled functions that code calls (see
      above), and gives the library back its reload_init (see _FillOnLoad).
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
        # (the loader binds the machine code's slot references to the symbols every SeparatelyCompiled declared
        # when it was made)
        result = self._load(sig, target_context)
        # Filled (or, in a compile session, deferred) only once the code is loaded, and only those its code calls:
        # on a miss the function is compiled next, and its typing registers the callees it calls; a function's
        # code names callees of branches numba prunes for some argument types (forward_pass's predict version
        # never calls the loss). Registering every named callee before the look-up made a cold first predict
        # wait for the loss to be compiled (0.6 s, AMD EPYC Zen 4), and a warm one compile it if the cache
        # lacked it.
        if result is not None:
            dtype = _first_float_dtype(sig.args if hasattr(sig, "args") else sig)
            callees = _separate_callees(self._func) if dtype is not None else []
            called = _slot_symbols(result)
            for callee in callees:
                if called is None or callee.symbol(dtype) in called:
                    callee.register(dtype)
            # numba runs a loaded function's reload_init but gives its library an empty one: code compiled later
            # that links this function (a user's cached function calling a vocabulary kernel) would inherit
            # nothing, and load in a new process with the slots this code calls left empty (_FillOnLoad)
            result.library._reload_init.update(getattr(result, "reload_init", None) or ())
        return result

    def _load(self, sig, target_context):
        if not all(hasattr(self._cache, name) for name in ("_load_overload", "_guard_against_spurious_io_errors")):
            return self._cache.load_overload(sig, target_context)  # another numba's cache: its own load
        # numba's load refreshes its compiler first: imports every implementation module it has (numba.np.linalg
        # among them, which imports scipy.linalg where scipy is installed) and installs their registries. Only
        # compiling needs those (numba refreshes again before any compile); machine code loaded from the cache
        # needs numba's runtime (NRT), started here, and symbols that importing numba and the context already
        # registered. That refresh was 0.2-0.3 s of a warm first fit (0.38-0.43 -> 0.20-0.25 s, 32-64-64-5,
        # AMD EPYC Zen 4).
        nrt.rtsys.initialize(target_context)
        with self._cache._guard_against_spurious_io_errors():  # as numba's load (Windows' sharing errors)
            return self._cache._load_overload(sig, target_context)


def _slot_symbols(result):
    """The slots (SeparatelyCompiled.symbol) that a compile result's machine code refers to: the global variables
    of numba's module for linking, which it keeps beside a library's machine code; None where numba's library
    does not have one (then every callee the function names counts)."""
    module = getattr(getattr(result, "library", None), "_shared_module", None)
    if module is None:
        return None
    return {variable.name for variable in module.global_variables if variable.name.startswith("fastbp.slot.")}


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
    helpers, separately compiled functions, intrinsics' definitions, and the plain Python functions of func's own
    package that those name, such as an intrinsic's code generation helpers), their module-level numbers and
    tuples of numbers (numba freezes globals into the code), the whole source of the modules that define those
    intrinsics and plain functions, and each separately compiled function's symbol and declared types (a caller
    passes its arguments as declared: a cached caller of an older declaration passed an int64 where the callee
    now read a float64, tests/test_jit_cache.py)."""
    digest = hashlib.sha256()
    package = func.__module__.split(".")[0]
    seen = set()
    pending = [func]
    lowering_modules = set()
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
                lowering_modules.add(__name__)  # the call's lowering (_register_call_typing) is this module's
                digest.update(value.symbol("").encode())
                for dtype in (types.float32, types.float64):
                    digest.update(repr((tuple(value.signature_for(dtype)), value.returns)).encode())
                pending.append(value.py_func)
            elif hasattr(value, "py_func") and hasattr(value, "overloads"):  # a numba dispatcher
                pending.append(value.py_func)
            elif hasattr(value, "_defn") and callable(value._defn):  # a numba intrinsic
                pending.append(value._defn)
                lowering_modules.add(value._defn.__module__)
            elif _plain_value(value):
                digest.update(f"{name}={value!r}".encode())
            elif isinstance(value, python_function) and value.__module__.split(".")[0] == package:
                pending.append(value)  # a plain Python function of this package (a stub numba lowers, a helper)
                lowering_modules.add(value.__module__)
    # The whole source of each module whose intrinsics or plain functions the code reaches: such a module also
    # registers code generation that no name leads to (simd's operators on its vectors, _jit's calls by symbol,
    # a lower_builtin of a stub function).
    for module in sorted(lowering_modules):
        digest.update(_source_digest(module))
    return digest.hexdigest()


@functools.cache
def _source_digest(module_name: str) -> bytes:
    import sys

    path = getattr(sys.modules.get(module_name), "__file__", None)
    try:
        with open(path, "rb") as source:
            return hashlib.sha256(source.read()).digest()
    except (OSError, TypeError):  # no source file (a frozen application): its name only
        return module_name.encode()


def _plain_value(value) -> bool:
    # A number, string or (nested) tuple of them: what numba freezes into compiled code as a constant.
    if isinstance(value, tuple):
        return all(_plain_value(item) for item in value)
    return isinstance(value, (bool, int, float, str))


def _code_bytes(code) -> bytes:
    # A code object's parameters, bytecode and constants, nested code objects (closures, lambdas) included.
    parts = [repr((code.co_argcount, code.co_kwonlyargcount, code.co_varnames)).encode(), code.co_code]
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


def _named_values(func) -> list:
    """What func's code names: its globals, and the attributes of the modules among them (``gemm.product``)."""
    names = func.__code__.co_names
    values = [func.__globals__.get(name) for name in names]
    return values + [getattr(module, name, None) for module in values if isinstance(module, types_module)
                     for name in names]


def _separate_callees(func, seen=None):
    """The SeparatelyCompiled functions whose symbols func's machine code needs: those its code names (globals,
    and attributes of the modules it names) and, through the compiled functions it names (inlined or linked:
    their code becomes func's), those theirs need. A SeparatelyCompiled callee's own needs are registered when
    it is loaded, so the walk stops there."""
    seen = set() if seen is None else seen
    if func in seen:
        return []
    seen.add(func)
    found = []
    for value in _named_values(func):
        if isinstance(value, SeparatelyCompiled):
            found.append(value)
        elif hasattr(value, "py_func") and hasattr(value, "overloads"):  # a numba dispatcher
            found.extend(_separate_callees(value.py_func, seen))
    return found


# --- compile sessions: a cold first call compiled on two cores ------------------------------------------------
# A driver's first call in a process with an empty disk cache compiles the driver and, through it, every
# separately compiled function it reaches: a 32-64-64-5 fit compiled six of them one after another, 9.6 s in
# all, of which 3.6 s the product engine's worker (AMD EPYC Zen 4). numba compiles one function at a time
# under one lock, and most of it holds the GIL, so threads cannot share the work; processes can, through the
# disk cache. Because callers reach their callees through slots, a caller's compilation needs only its callees'
# declared types: the backends call their drivers through Entry, whose first call per dtype compiles in a
# session that defers every slot it meets. At the start of the session, the deepest separately compiled
# functions the driver can reach (the leaves of that call tree: the product worker, the loss, the optimizer)
# that the disk cache lacks go to one helper process (python -m fastbp._compile_worker), which compiles them
# into the cache while this process compiles the driver and the functions above the leaves. Each leaf is
# claimed (an exclusively created file) by whichever process takes it first; this process, done with its own
# part, takes leaves the helper has not started, from the other end of the list; then it waits for the helper
# and loads the rest from the cache. Whatever goes wrong with the helper, this process compiles what is
# missing itself; a helper stops once its parent has exited. A backend may start that helper earlier, when a
# trainer is made (prefetch), for the drivers it will surely call (and, last, the versions of a driver it will
# call after its fit: DriverVersion): the helper then compiles while this process compiles something else (a
# fused narrow kernel, another driver); a later trainer's needs go to a helper still busy through its queue
# file, ahead of what is left of its list. Without a disk cache, with one usable CPU,
# with FASTBP_COMPILE_PROCESSES=1 or inside the helper (or in a bundled application), a session compiles
# everything in this process, as before.
_session = None  # the session in progress (numba's global compiler lock is held), or None
WORKER_VARIABLE = _standby.WORKER_VARIABLE  # set in the helper's environment: it never starts another


class _CompileSession:
    def __init__(self):
        self.pending = []  # (SeparatelyCompiled, dtype) met while typing or loading, slots still empty
        self.optional = []  # the same for optional functions: see _fill_optional

    def defer(self, function, dtype):
        if function.on_request:  # its caller's business (fill_now)
            return
        deferred = self.optional if function.optional else self.pending
        if (function, dtype) not in deferred:
            deferred.append((function, dtype))

    def fill_pending(self, skip=()):
        """Fill every deferred slot but those in ``skip`` (filling one may defer more); the skipped ones."""
        skipped = []
        while self.pending:
            function, dtype = self.pending.pop(0)
            if (function, dtype) in skip:
                skipped.append((function, dtype))
            else:
                function.fill(dtype)
        return skipped


def _leaves(entry_func):
    """The separately compiled functions that ``entry_func`` reaches and that reach none, in the order a helper
    should take them. Only the leaves: with the whole tree (the product engine and the batch gradient too), the
    helper, working deepest first, took the product engine after the worker and the loss, and a cold first fit
    waited for it (32-64-64-5, AMD EPYC Zen 4: 5.6 -> 6.2 s); this process compiles what lies between while the
    helper compiles the leaves."""
    depth = {}
    frontier = [(callee, 1) for callee in _required_callees(entry_func)]
    callees_of = {}
    while frontier:
        function, level = frontier.pop()
        if depth.get(function, 0) >= level:
            continue
        depth[function] = level
        if function not in callees_of:
            callees_of[function] = _required_callees(function.py_func)
        frontier.extend((callee, level + 1) for callee in callees_of[function])
    leaves = [function for function in depth if not callees_of[function]]
    # deepest first, and at one depth the most code first (a rough measure of its compile time): the helper starts
    # at the front, this process takes from the back
    return sorted(leaves, key=lambda function: (-depth[function], -_code_size(function.py_func),
                                                function.__qualname__))


def _code_size(func, seen=None) -> int:
    """Bytes of bytecode that func's compiled code is built from: its own and that of the compiled functions it
    names, inlined or linked (not the separately compiled ones, which are compiled on their own). The product
    engine's drivers' product is a short function whose plain product and epilogue are inlined: by its own
    bytecode, a cold predict's helper took the loss before it."""
    seen = set() if seen is None else seen
    if func in seen:
        return 0
    seen.add(func)
    size = len(func.__code__.co_code)
    for value in _named_values(func):
        if hasattr(value, "py_func") and hasattr(value, "overloads"):  # a numba dispatcher (not a SeparatelyCompiled)
            size += _code_size(value.py_func, seen)
    return size


def _required_callees(func):
    return [callee for callee in _separate_callees(func) if not (callee.optional or callee.on_request)]


def _optional_callees(entry_func):
    """The optional separately compiled functions that ``entry_func``'s call tree reaches, each after the optional
    ones it calls (the product engine's worker before its parallel region, which calls it): the order a helper
    compiles them in, and this process loads them in."""
    found, seen = [], set()

    def visit(function):
        if function not in seen:
            seen.add(function)
            for callee in sorted(_separate_callees(function.py_func), key=lambda f: f.__qualname__):
                visit(callee)
            if function.optional:
                found.append(function)

    for callee in sorted(_separate_callees(entry_func), key=lambda f: f.__qualname__):
        visit(callee)
    return found


_one_process = [0]  # > 0 inside one_compile_process()


@contextlib.contextmanager
def one_compile_process():
    """Within the block, compile sessions start no helper process (for callers that already compile on several
    processes, such as fastbp.precompile)."""
    _one_process[0] += 1
    try:
        yield
    finally:
        _one_process[0] -= 1


def _helper_allowed() -> bool:
    # CACHE_ENABLED as this process decided it at import (cpu_jit's caching), not as the environment says now
    return not _one_process[0] and CACHE_ENABLED and _standby.helpers_allowed()


usable_cpus = _standby.usable_cpus


def _module_attribute(function) -> str:
    """'module:attribute' under which ``function`` (a SeparatelyCompiled) can be imported."""
    import sys

    module = sys.modules[function.py_func.__module__]
    for name, value in vars(module).items():
        if value is function:
            return f"{module.__name__}:{name}"
    raise LookupError(f"{function!r} is not a global of {module.__name__}")


def _import_attribute(module: str, attribute: str):
    import importlib

    return getattr(importlib.import_module(module), attribute)


def claim(folder: str, function, dtype) -> bool:
    """Take ``function``'s ``dtype`` version for this process; False if another process already has."""
    return _standby.claim_file(folder, function.symbol(dtype))


helper_environment = _standby.helper_environment


def queue_file(folder: str) -> str:
    """The file in a helper's claim folder that lists, one 'module:attribute' a line, the leaves given to it after
    it started (see _Helper.add); a line ending in LAST_SUFFIX goes after the rest of its list."""
    return os.path.join(folder, "queue")


LAST_SUFFIX = " last"


def done_marker(folder: str, function, dtype) -> str:
    """The file a helper creates once ``function``'s ``dtype`` version is in the disk cache."""
    return os.path.join(folder, function.symbol(dtype) + ".done")


def exit_marker(folder: str) -> str:
    """The file a process creates in the claim folder of its helper when it exits (_forget_helpers): the helper
    then compiles nothing more and removes the folder once it stops, even if that process is still shutting
    down (claims are named 'fastbp.*', so no claim is named like this)."""
    return os.path.join(folder, _standby.EXIT_MARKER)


class _Helper:
    """A helper process compiling ``leaves`` into the disk cache, deepest first (see "compile sessions")."""

    def __init__(self, leaves, dtype):
        import subprocess
        import sys
        import tempfile

        self.leaves = leaves
        self.dtype = dtype
        self.owner = os.getpid()  # a forked child inherits this object, not the process: see _helper_for
        names = [_module_attribute(function) for function in leaves]
        standby = _standby.take()  # started by ``import fastbp`` on a cold cache, and ready to compile by now
        if standby is not None:
            self.process, self.folder = standby
            _standby.write_assignment(self.folder, dtype, names)
            return
        self.folder = tempfile.mkdtemp(prefix="fastbp-compile-")
        env = helper_environment(**{WORKER_VARIABLE: "1"})
        command = [sys.executable, "-m", "fastbp._compile_worker", self.folder, str(os.getpid()), str(dtype), *names]
        # In a session of its own: a Ctrl-C, or a kill of the script's process group (a CI step's end, `timeout`),
        # would stop it mid-compile and leave its claim folder behind in the temporary directory (found: 150 of
        # them after a day of test runs here). It stops by itself once the script has exited, after the function
        # it is compiling (seconds), and removes the folder then (fastbp._compile_worker).
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def take(self, needed, dtype):
        """Make the ``needed`` leaves loadable: those the helper has not started are compiled here (last first),
        the others waited for (until the helper marks them done, or exits); leaves not needed stay with it."""
        mine = []
        for function in reversed(self.leaves):  # one at a time: the helper takes from the front meanwhile
            if function in needed and claim(self.folder, function, dtype):
                mine.append(function)
                function.fill(dtype)
        for function in needed:
            while (function not in mine and self.process.poll() is None
                   and not os.path.exists(done_marker(self.folder, function, dtype))):
                time.sleep(0.005)

    def add(self, functions, last=False) -> None:
        """Give the running helper ``functions`` (a later trainer's needs, some perhaps on its list already): it
        takes them, in this order, before what is left of its list (after it, with ``last``: optional ones),
        through its queue file. One that exits before it reads them leaves them to this process (take() stops
        waiting for an exited helper)."""
        if functions:
            self.leaves.extend(function for function in functions if function not in self.leaves)
            suffix = LAST_SUFFIX if last else ""
            with open(queue_file(self.folder), "a") as queue:  # one write: appends do not interleave
                queue.write("".join(_module_attribute(function) + suffix + "\n" for function in functions))

    def finished(self, dtype) -> bool:
        """Whether every one of its leaves is done (marked by the helper, or filled in this process): its process
        may still be exiting."""
        return all(dtype in leaf._results or os.path.exists(done_marker(self.folder, leaf, dtype))
                   for leaf in self.leaves)

    def close(self) -> None:
        """Forget a helper that has exited: remove its claim folder."""
        import shutil

        if self.process.poll() is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


_helpers = {}  # dtype -> the helper compiling for that dtype (a session's, or prefetch's), until it is done
_retired = []  # helpers done with their work whose processes were still exiting: their folders go at exit


def _helper_for(dtype, dispatchers, first=(), extend=False, then=()):
    """The running helper for ``dtype`` (given those of the functions below that it lacks, with ``extend``);
    else a new one for the separately compiled functions ``first``, the leaves of the dispatchers' call trees
    and the DriverVersions ``then`` that are missing, in that order (None when nothing is, or helpers are not
    allowed)."""
    helper = _helpers.get(dtype)
    if helper is not None and helper.owner != os.getpid():
        del _helpers[dtype]  # inherited through fork: the parent's helper, whose folder is the parent's to remove
        helper = None
    elif helper is not None and (helper.process.poll() is not None or helper.finished(dtype)):
        # done: its leaves are in the disk cache (or it failed). Not waited for while its process exits: a
        # script's second trainer would otherwise compile here what a new helper could (measured in the demo).
        helper.close()
        if helper.process.poll() is None:
            _retired.append(helper)
        del _helpers[dtype]
        helper = None
    if (helper is not None and extend) or (helper is None and _helper_allowed()):
        missing = [function for function in first if _missing(function, dtype)]
        missing += [leaf for leaf in _missing_leaves(dispatchers, dtype) if leaf not in missing]
        missing += [version for version in then if _missing(version, dtype)]
        optional = [function for dispatcher in dispatchers for function in _optional_callees(dispatcher.py_func)
                    if _missing(function, dtype)]
        optional = [function for function in dict.fromkeys(optional) if function not in missing
                    and (helper is None or function not in helper.leaves)]
        if helper is not None:
            # still busy: it takes these before what is left of its list (the demo's second trainer, made while
            # the first's helper compiled the loss, compiled its optimizer step in this process: 0.6 s). Only from
            # prefetch: a session's leaves are those its driver's code names, some in branches numba prunes.
            helper.add(missing)
            helper.add(optional, last=True)
        elif missing or optional:
            helper = _helpers[dtype] = _Helper(missing + optional, dtype)
    return helper


def _counted_as_compiling(dispatcher, args):
    """numba's compile event around work of this process that counts as compiling ``dispatcher`` for ``args``
    (waiting for a helper, or filling a slot), as fastbp.compile_seconds and the compile notice count it."""
    from numba.core import event

    return event.trigger_event("numba:compile", data=dict(dispatcher=dispatcher, args=args, return_type=None))


def compile_in_session(dispatcher, signature):
    """Compile ``dispatcher`` for ``signature`` and fill every slot it needs, sharing the work with a helper
    process where that pays (see "compile sessions" above). Returns when the function can run."""
    global _session
    from numba.core.compiler_lock import global_compiler_lock

    dtype = _first_float_dtype(signature)
    with global_compiler_lock:  # no other thread compiles (or meets a deferred slot) meanwhile
        if _session is not None or dtype is None:  # nested, or nothing to share: compile as usual
            dispatcher.compile(signature)
            return
        helper = _helper_for(dtype, [dispatcher]) if tuple(signature) not in dispatcher.overloads else None
        version = _version_of(dispatcher, signature, dtype) if helper is not None else None
        _session = session = _CompileSession()
        try:
            if version is not None and version in helper.leaves:  # the helper's, unless it has not started it
                with _counted_as_compiling(dispatcher, signature):
                    helper.take([version], dtype)
            dispatcher.compile(signature)  # loaded from the disk cache if the helper compiled it
            if helper is None:
                session.fill_pending()
            else:
                waiting = session.fill_pending(skip={(leaf, dtype) for leaf in helper.leaves})
                if waiting:
                    with _counted_as_compiling(dispatcher, signature):  # the wait
                        helper.take([function for function, _ in waiting], dtype)
                    session.pending[:0] = waiting
                    session.fill_pending()  # from the disk cache, or compiled here if the helper failed
        finally:
            _session = None
        for function, function_dtype in session.optional:
            _fill_optional(function, function_dtype, helper)


# The optional functions this process does not have yet: (function, dtype, the helper compiling it, or None where
# this process compiles it once wanted), until filled.
_optional_pending = []
_next_poll = [0.0]  # time.monotonic() of the next look at them (Entry)
POLL_SECONDS = 0.01


def _fill_optional(function, dtype, helper) -> None:
    """A session's end for an optional function it met (see "Optional slots"): filled from the disk cache, left to
    ``helper`` (loaded by a later Entry call, _poll_optional), compiled here at once inside one_compile_process
    (precompile fills the cache with it), or else left for this process to compile once a caller wants it."""
    if dtype in function._results or any(item[:2] == (function, dtype) for item in _optional_pending):
        return
    if function.in_disk_cache(dtype) or _one_process[0]:
        function.fill(dtype)
    elif helper is not None and helper.process.poll() is None:
        if function not in helper.leaves:
            helper.add([function], last=True)
        _optional_pending.append((function, dtype, helper))
    else:
        _optional_pending.append((function, dtype, None))


def _poll_optional() -> None:
    """Load the optional functions that helpers have compiled since the last look (at most every POLL_SECONDS), and
    compile those that no helper compiles (none started, or it exited without them) once a caller has wanted them.
    Entry calls it while any are pending (for good, in a process that never wants one), once _next_poll has come:
    the next look is POLL_SECONDS after this one."""
    from numba.core.compiler_lock import global_compiler_lock

    _next_poll[0] = time.monotonic() + POLL_SECONDS
    with global_compiler_lock:
        for item in list(_optional_pending):
            function, dtype, helper = item
            if dtype in function._results:
                _optional_pending.remove(item)
            elif helper is not None and helper.owner != os.getpid():
                # inherited through fork: the parent's helper, which this process cannot wait for; loaded once the
                # disk cache has it (the parent's helper writes it there), never compiled here
                if function.in_disk_cache(dtype):
                    _optional_pending.remove(item)
                    function.fill(dtype)
            elif helper is not None and os.path.exists(done_marker(helper.folder, function, dtype)):
                _optional_pending.remove(item)
                function.fill(dtype)  # from the disk cache
            elif helper is None or helper.process.poll() is not None:  # this process's to compile, once wanted
                if function.wanted(dtype):
                    _optional_pending.remove(item)
                    function.fill(dtype)


def fill_now(function, dtype) -> None:
    """Put the ``function``'s ``dtype`` version in its slot before the next call: loaded from the disk cache, waited
    for where a helper of this process is compiling it, or compiled here (where no helper has started it, or none
    compiles it). For an optional function, a caller whose next call would run long without it (a backend's first
    fit of a large data set, where the product engine's plain product is several times slower than its tiles):
    waiting for the compile costs seconds, the other way could cost more. For one filled on request, a caller whose
    next call reaches it. Nothing to do where the slot is filled already."""
    from numba.core.compiler_lock import global_compiler_lock

    if dtype in function._results:
        return
    with global_compiler_lock:
        pending = [item for item in _optional_pending if item[:2] == (function, dtype)]
        for item in pending:
            _optional_pending.remove(item)
        if function.in_disk_cache(dtype):  # loaded: no compiling to count (fastbp.precompile's users compile none)
            function.fill(dtype)
            return
        with _counted_as_compiling(function.dispatcher, tuple(function.signature_for(dtype))):
            # the helper a pending optional function was left to, or this dtype's (where one filled on request is
            # on its list)
            for helper in dict.fromkeys([item[2] for item in pending] + [_helpers.get(dtype)]):
                if helper is not None and helper.owner == os.getpid() and function in helper.leaves:
                    helper.take([function], dtype)  # claimed here if the helper has not started it, else waited for
                    break
            function.fill(dtype)  # from the disk cache where the helper put it, else compiled here


def take_unstarted(function, dtype) -> None:
    """Compile ``function``'s ``dtype`` version here now where this process's helper has it on its list and has
    not started it (claimed, as a session takes a leaf); else nothing (fill_now then loads or waits for it)."""
    from numba.core.compiler_lock import global_compiler_lock

    helper = _helpers.get(dtype)
    if (dtype in function._results or helper is None or helper.owner != os.getpid() or function not in helper.leaves
            or helper.process.poll() is not None):
        return
    with global_compiler_lock:
        if claim(helper.folder, function, dtype):
            with _counted_as_compiling(function.dispatcher, tuple(function.signature_for(dtype))):
                function.fill(dtype)


def _missing_leaves(dispatchers, dtype):
    """The leaves of the dispatchers' call trees (see _leaves) that neither this process nor the disk cache holds
    for ``dtype``, deepest first, each once."""
    missing = []
    for dispatcher in dispatchers:
        for leaf in _leaves(dispatcher.py_func):
            if leaf not in missing and _missing(leaf, dtype):
                missing.append(leaf)
    return missing


def _missing(function, dtype) -> bool:
    """Whether neither this process nor the disk cache holds the separately compiled ``function`` for ``dtype``."""
    return dtype not in function._results and not function.in_disk_cache(dtype)


_prefetch_checked = set()  # (dtype, drivers) prefetch has looked at in this process


@atexit.register
def _forget_helpers() -> None:
    # Remove the claim folder of each helper that has exited, or that has nothing left to compile (its leaves all
    # done, here or there) and is only exiting: waited for, briefly. Before that wait, such a helper saw this
    # process still alive when it ended, this process saw it still running, and neither removed the folder
    # (found: one left in the temporary directory by every short script whose fit took a leaf from its helper).
    # One still compiling removes the folder itself once it finishes (fastbp._compile_worker): it sees the exit
    # marker written here, or that its parent has gone. The marker, not the parent's pid alone: after this
    # function this process can take a second or more to shut down (numba's and the thread pools' teardown), and
    # a helper that finished meanwhile saw its parent alive and left the folder (found: one left in the
    # temporary directory by every cold run of examples/demo.py). Written before the helper's state is read:
    # a helper that finishes after the marker is written removes the folder, one that finished before it is
    # waited for below and its folder removed here.
    import subprocess

    for helper in list(_helpers.values()) + _retired:
        if helper.owner == os.getpid():
            if helper.process.poll() is None:
                try:
                    open(exit_marker(helper.folder), "wb").close()
                except OSError:  # the folder is gone: nothing to clean up
                    pass
                if helper.finished(helper.dtype):
                    try:
                        helper.process.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        pass
            helper.close()


def prefetch(dispatchers, dtype, first=(), then=()) -> None:
    """Start compiling, in a helper process, the leaves of the dispatchers' call trees that the disk cache lacks
    for ``dtype`` (a numba float type), after the separately compiled functions ``first`` (those of them it lacks:
    what this process will need first) and before the DriverVersions ``then`` (what it will need after the
    drivers: a trainer's predict and evaluation), and return at once. A backend calls it when a trainer is made,
    with the drivers its next calls will surely need (every trainer predicts through the product engine; a wide
    one also fits there): the helper then compiles while the user's script goes on (loading data, compiling the fused
    narrow kernel of a narrow fit, or another driver), and each session of that dtype waits only for the leaves
    it needs. Once per dtype and set of drivers in a process, only where a session would start a helper; a
    helper of that dtype that is still busy takes those it lacks before what is left of its own list (_Helper.add)."""
    key = (dtype, tuple(dispatcher.py_func.__qualname__ for dispatcher in dispatchers),
           tuple(function.__qualname__ for function in list(first) + list(then)))
    if key not in _prefetch_checked:
        _prefetch_checked.add(key)
        _helper_for(dtype, dispatchers, first, extend=True, then=then)


def read_only(a):
    """``a``, or a read-only view of it: how fastbp's backends hand the data (X, Y, sample weights) to the drivers
    and the fused narrow kernel, which are compiled for read-only data arrays. numba compiles a function once per
    argument types, and whether an array is writable is part of its type: a read-only X (a memory map, a pandas
    frame's values under copy-on-write, scikit-learn's readonly_memmap checks) compiled the fused kernel again
    (3-5 s) and the general path's drivers again, and a read-only Y once more. The view costs 0.6 us (0.1 us for
    an array that is read-only already): nothing beside a fit or an evaluation, but 6% of a one-row predict,
    which therefore takes the caller's array as it is (a read-only one compiles the predict driver once more, once
    per machine). Compiled code also cannot write into the caller's data this way."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


def _dtype_of(args):
    # The dtype of the first argument that has one (a driver call's: every call passes here, so the fast test
    # first; a generator costs 0.3 us).
    dtype = getattr(args[0], "dtype", None)
    if dtype is None:
        dtype = next((a.dtype for a in args if hasattr(a, "dtype")), None)
    return dtype


class Entry:
    """A driver as fastbp's backends call it from Python: the first call per dtype compiles it with
    :func:`compile_in_session`; later calls go straight to the dispatcher (a new signature of a known dtype
    compiles as numba always does, in this process)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._ready = set()  # dtypes (of the first argument that has one) already prepared

    def __getstate__(self):
        return {"dispatcher": self.dispatcher, "_ready": set()}  # unpickled elsewhere: prepared there again

    def __call__(self, *args):
        if _dtype_of(args) not in self._ready:
            self.prepare(*args)
        if _optional_pending and time.monotonic() >= _next_poll[0]:  # the test first: every call passes here
            _poll_optional()
        return self.dispatcher(*args)

    def prepare(self, *args):
        """Compile for these arguments' dtype now, as the first call would (in a compile session), without
        calling: for a caller that must do something between the compile and the call."""
        dtype = _dtype_of(args)
        if dtype not in self._ready:
            compile_in_session(self.dispatcher, tuple(self.dispatcher.typeof_pyval(a) for a in args))
            self._ready.add(dtype)


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
