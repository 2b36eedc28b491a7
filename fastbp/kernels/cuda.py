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
                sqrt_bias_correction2, decay)
    gather_rows(out, source, order, start)
plus what the CPU does inline but the GPU needs as launches: ``sum_into`` (a deterministic one-block
reduction), ``add_into`` (chunked gradients) and ``array_stats`` (the check of a GPU input, grid-wide).

The training path does not call these per layer: ``fastbp.kernels.cuda_step`` runs a whole step in at most
L + 2 launches over flat buffers and ``fastbp.kernels.cuda_fused`` a small network's whole fit in one
launch. Both build on the pieces here: the register-tiled product (``tile_code``), the launch path
(``launch``), and CUDA graphs (``Graph``).

Products (``dense_forward``, ``dense_backward_params``, ``dense_backward_input``): a block computes a
BM x BN tile of the output, each thread a TM x TN register tile of it, over shared (BK, BM + pad) and
(BK, BN + pad) operand tiles. The k loop inside a tile has a constant trip count (BK) over tiles that are
zero-padded past the operands' edges, so it unrolls and adds exact zeros (sums are bit-identical to the
unpadded ones); the pad makes the transposing stores into shared memory free of bank conflicts; bias and
activation (or the activation's derivative) are applied to the registers before the one store.
``*_naive`` kernels (one thread per output element, serial dot product) are the references the tiled
kernels are tested against. Each thread owns its outputs: no atomics, sums in a fixed order, so runs are
deterministic and the targets agree to rounding.

Every kernel OVERWRITES its outputs (except ``add_into``, which exists to accumulate) and allocates
nothing. This is the ONE module that imports the CUDA binding (``numba.cuda``; ``cuda.core`` for graphs):
the other kernel modules take ``cuda`` from here, so switching to another binding is a change to this
file. Decorators are lazy (no signatures): importing works without a GPU, and ``kernel_signatures``
lists the signatures the backend launches of this module's kernels; the repository's
``dev/cuda_report.py`` covers all three kernel modules for the PTX check (``tests/cuda/test_ptx.py``) and the
resource report (``python -m dev.cuda_report``).

Launch settings are module-level so tests can shrink them (inputs then span several blocks, with a
partial one). They size shared and local arrays, so on a GPU they are compile-time constants: change them
only before the first launch in a process (kernels are built once per setting, see ``_built``).
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
# Register-tiled products: name -> (BM, BN, BK, TM, TN): a block computes a BM x BN output tile with
# (BM / TM) * (BN / TN) threads, each a TM x TN register tile, stepping BK along the summed axis.
# "r8" (64 threads, 8 x 8 per thread) for large grids; "r4" (256 threads, 4 x 4) and "r4s" (32 x 32 tiles,
# 64 threads) where 64 x 64 tiles would leave most of the GPU idle (W3 at batch 128: 2 x 4 tiles).
PRODUCT_CONFIGS = {"r8": (64, 64, 8, 8, 8), "r4": (64, 64, 16, 4, 4), "r4s": (32, 32, 8, 4, 4)}
# Registers each product configuration may use (its launch bounds: threads per block, and blocks per
# multiprocessor = 65536 / (threads * registers)). Without bounds ptxas takes up to 255 registers (it hoists
# every load address it can out of the k loop). The 8 x 8 tile needs 196 (4 blocks of 64 threads per SM).
PRODUCT_REGISTERS = {"r8": 255, "r4": 128, "r4s": 96}
# The vocabulary launchers' tile (dense_forward & co.): the 4 x 4 register tile on 64 x 64 blocks.
VOCABULARY_CONFIG = "r4"
BLOCK_2D = (16, 16)  # naive dense kernels and gather_rows: (columns, rows) threads per block
BLOCK_1D = 256  # per-row and per-element kernels
REDUCE_THREADS = 256  # one-block reductions (sum_into, the second pass of array_stats): a power of two
STATS_BLOCKS = 1024  # array_stats' first pass: at most this many blocks (each reduces a contiguous chunk)
# fastmath: fused multiply-add, approximate division / sqrt / exp / log, flushed denormals. Parity tests
# allow for it on hardware (the simulator ignores it). FASTBP_CUDA_FASTMATH=0 turns it off. numba-cuda
# turns any truthy fastmath into LLVM's full "fast" flags, which include no-NaN / no-inf: kernels whose
# results feed a finiteness check (losses, the input check) are compiled without it (see STRICT).
FASTMATH = os.environ.get("FASTBP_CUDA_FASTMATH", "1").lower() not in ("0", "false", "no", "off")

SIMULATOR = bool(config.ENABLE_CUDASIM)  # numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) is active

kernel = cuda.jit(fastmath=FASTMATH)
# Kernels that compute or check losses: no fast-math flags, so isfinite and NaN propagation are kept. FMA
# contraction stays on (libNVVM's default), so their products still compile to FFMA.
strict_kernel = cuda.jit(fastmath=False)
# Helpers inlined into every kernel that calls them: only inline device functions compile to PTX without a
# GPU (a separately compiled device function asks the driver to link it).
device_inline = cuda.jit(device=True, inline="always")


def _make_simulator_shared_arrays_thread_safe() -> None:
    """Under the simulator, give each launch ONE array per ``cuda.shared.array`` call site, whatever the timing.

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


# --- what may compile here ------------------------------------------------------------------------------------
def numpy_problem() -> str | None:
    """Why numba-cuda cannot compile CUDA kernels with the installed numpy, or None.

    numba-cuda 0.30.4 registers ``np.row_stack`` in its typing tables, which numpy 2.5 removed: every real
    CUDA compilation then fails deep inside numba. The simulator and the CPU target are not affected."""
    try:
        major, minor = (int(part) for part in np.__version__.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) >= (2, 5):
        return (f"numpy {np.__version__} is installed, but numba-cuda 0.30 compiles CUDA kernels only with "
                "numpy < 2.5 (it uses np.row_stack, removed in numpy 2.5); install a supported numpy with: "
                "pip install 'numpy<2.5'")
    return None


def check_can_compile() -> None:
    """Raise RuntimeError (with the fix) when CUDA kernels cannot be compiled in this environment."""
    problem = numpy_problem()
    if problem is not None and not SIMULATOR:
        raise RuntimeError(problem)


# --- device handling (every use of the binding outside kernels goes through here) ------------------------
def unavailable_reason() -> str | None:
    """None when CUDA kernels can run here (a GPU, or the simulator), otherwise why not and how to fix it."""
    if getattr(cuda, "implementation", None) != "NVIDIA":
        return ("numba's built-in, deprecated CUDA target is active instead of numba-cuda; install it with: "
                "pip install 'fastbp[cuda]'")
    if not SIMULATOR and numpy_problem() is not None:
        return numpy_problem()
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
    purpose, and one warning per launch helps no one."""
    context = warnings.catch_warnings()

    class _Quiet:
        def __enter__(self):
            context.__enter__()
            warnings.simplefilter("ignore", NumbaPerformanceWarning)

        def __exit__(self, *exc):
            return context.__exit__(*exc)

    return _Quiet()


# --- the launch path: every launch of fastbp goes through launch() ----------------------------------------
_recorders: list = []


def kernel_name(kern) -> str:
    return kern.py_func.__name__


def launch(kern, grid, block, args, shared: int = 0, stream=0) -> None:
    """kern[grid, block, stream, shared](*args). The one place fastbp launches a kernel: tests count launches
    here (``recording``), and a graph capture passes its builder as ``stream``."""
    for recorder in _recorders:
        recorder.append(kernel_name(kern))
    kern[grid, block, stream, shared](*args)


class recording:
    """``with recording() as names:`` collects the name of every kernel launched inside the block."""

    def __enter__(self) -> list:
        self.names = []
        _recorders.append(self.names)
        return self.names

    def __exit__(self, *exc):
        _recorders.remove(self.names)


# --- CUDA graphs (GPU only) -------------------------------------------------------------------------------
def graphs_unavailable_reason() -> str | None:
    """None when launches can be captured into a CUDA graph here, else why not.

    numba-cuda 0.30 launches a kernel into a ``cuda.core`` GraphBuilder passed as the launch's stream
    (numba-cuda PR #836; its test_cuda_driver.py shows kernel[grid, block, builder](...)). The simulator
    has no graphs; FASTBP_CUDA_GRAPHS=0 turns them off."""
    if SIMULATOR:
        return "numba's CUDA simulator has no graphs"
    if os.environ.get("FASTBP_CUDA_GRAPHS", "1").lower() in ("0", "false", "no", "off"):
        return "FASTBP_CUDA_GRAPHS=0"
    try:
        from cuda.core import Device  # noqa: F401
    except ImportError as error:
        return f"cuda.core is not importable ({error})"
    return None


class Graph:
    """A fixed sequence of launches captured once into a CUDA graph and replayed with one host call.

    ``records``: [(kernel, grid, block, args, shared)], launched in order. Arguments are frozen at capture
    (pointers and scalars), so everything that changes between replays must be read from device memory by
    the kernels themselves. Memory copies are not captured: copies that belong in a replay are kernels."""

    def __init__(self, records):
        from cuda.core import Device, Stream

        device = Device()
        device.set_current()  # the primary context numba already uses
        builder = device.create_graph_builder()
        builder.begin_building()
        try:
            for kern, grid, block, args, shared in records:
                launch(kern, grid, block, args, shared, stream=builder)
        finally:
            builder.end_building()
        self._graph = builder.complete()
        # The legacy default stream (handle 0): the one numba's own launches and copies use, so a replay is
        # ordered with them (as numba-cuda's own _to_core_stream(0) does).
        self._stream = Stream.from_handle(0)
        self._graph.upload(self._stream)
        self.n_launches = len(records)

    def replay(self) -> None:
        for recorder in _recorders:  # a replay counts as one host launch in the counts tests take
            recorder.append("graph")
        self._graph.launch(self._stream)

    def close(self) -> None:
        self._graph.close()


# --- inline building blocks of the register-tiled products ------------------------------------------------
# Kernels and generated code are built once per launch setting (see the module docstring).
_built: dict = {}


def _cached(key, build):
    kern = _built.get(key)
    if kern is None:
        kern = _built[key] = build()
    return kern



def tile_shapes(name: str):
    """(BM, BN, BK, TM, TN, threads, pad) of product configuration ``name`` (PRODUCT_CONFIGS)."""
    bm, bn, bk, tm, tn = PRODUCT_CONFIGS[name]
    threads = (bm // tm) * (bn // tn)
    if bm % tm or bn % tn or (bm * bk) % threads or (bn * bk) % threads:
        raise ValueError(f"product configuration {name}={PRODUCT_CONFIGS[name]}: tiles must split evenly "
                         f"over its {threads} threads")
    # Shared tiles are stored (BK, rows + pad). Where a warp writes a tile along k (operands contiguous along
    # the summed axis), consecutive threads write rows pad + ... apart: pad = 32 / BK words puts the 32
    # threads of a warp in 32 different banks (no pad: up to BK-way conflicts).
    pad = max(1, 32 // bk)
    return bm, bn, bk, tm, tn, threads, pad


@device_inline
def operand_value(src, off, s_row, s_k, n_rows, n_k, row, k, gather, order, o_off, ones_row):
    # Element (row, k) of an operand stored at src[off + row * s_row + k * s_k]; 0 past (n_rows, n_k) (the
    # zero padding the constant-trip-count loops rely on). Indices are cast to unsigned where they are used:
    # numba cannot prove a signed index non-negative and adds a wraparound compare-and-select to every access
    # (it doubled the product's inner loop). ones_row: a row whose entries are 1 (the bias
    # row of [inp, 1].T @ dout), or -1. gather 1: row r is stored at row order[o_off + r]; 2: k likewise.
    if k >= n_k:
        return src.dtype.type(0.0)
    if row == ones_row:
        return src.dtype.type(1.0)
    if row >= n_rows:
        return src.dtype.type(0.0)
    if gather == 1:
        row = order[np.uint64(o_off + row)]
    elif gather == 2:
        k = order[np.uint64(o_off + k)]
    return src[np.uint64(off + row * s_row + k * s_k)]


def _generated(name: str, source: str, namespace: dict) -> dict:
    """exec ``source`` (functions of one tile configuration) into ``namespace``; every function defined there
    becomes an inline device function. The source is registered with linecache so tracebacks and numba's
    error messages can show it."""
    import linecache

    filename = f"<fastbp.kernels.cuda {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    before = set(namespace)
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - fastbp's own generated source
    for key in set(namespace) - before:
        if callable(namespace[key]) and not key.startswith("__"):
            namespace[key] = device_inline(namespace[key])
    return namespace


def product_launch_bounds(config: str, dtype=np.float32):
    """(threads per block, blocks per multiprocessor) that hold configuration ``config`` to its
    PRODUCT_REGISTERS (ptxas: registers <= 65536 / (threads * blocks)). float64 takes two registers a value:
    its builds get the whole 255 (one block per multiprocessor guaranteed), else its tiles spill."""
    threads = tile_shapes(config)[5]
    if np.dtype(dtype) == np.float64:
        return threads, 1
    # At most 16 blocks: sm_75 keeps no more resident (tests' tiny tiles would otherwise ask for hundreds).
    return threads, max(1, min(16, 65536 // (threads * PRODUCT_REGISTERS[config])))


def product_jit(config: str, dtype=np.float32):
    """The decorator of a product kernel of configuration ``config`` for ``dtype``: fastmath, and its launch
    bounds (the simulator's jit takes none). The float32 and float64 builds are separate dispatchers because
    their launch bounds differ."""
    if SIMULATOR:
        return kernel
    return cuda.jit(fastmath=FASTMATH, launch_bounds=product_launch_bounds(config, dtype))


def tile_code(config: str) -> dict:
    """The inline device functions of the register-tiled product for configuration ``config``, generated with
    every constant-trip-count loop written out (numba has no unroll pragma, and libNVVM leaves these loops
    rolled, which keeps the register tile in local memory): {"tile_product": ..., "SMEM": shared words}.

    tile_product(acc, smem, t, i0, j0, k_begin, k_end, M, N, A, a_off, a_si, a_sk, a_gather, a_ones,
                 B, b_off, b_sj, b_sk, order, o_off)
    sums A(i, k) B(k, j) over k in [k_begin, k_end) for the block's output tile C[i0:i0+BM, j0:j0+BN], with
    A(i, k) = A[a_off + i a_si + k a_sk] (M rows; a_ones: an all-ones row or -1; a_gather: see
    operand_value) and B(k, j) = B[b_off + j b_sj + k b_sk] (N columns), both zero past their edges, and
    leaves the tile in smem[0:BM * BN] (row-major) for the caller's epilogue (a rolled loop: written out per
    register, the epilogue's activations would be copied TM * TN times). smem (SMEM,) is the block's
    shared buffer: during the k loop it holds the operand tiles (BK, BM + pad) and (BK, BN + pad), then the
    output tile. acc (TM, TN) is a local array indexed only by constants, so it lives in registers. Every
    thread of the block calls it (it synchronises)."""
    return _cached(("tile_code", PRODUCT_CONFIGS[config]), lambda: _build_tile_code(config))


def _build_tile_code(config: str) -> dict:
    BM, BN, BK, TM, TN, T, PAD = tile_shapes(config)
    TX, TY = BN // TN, BM // TM
    SA, SB = BM + PAD, BN + PAD
    B_BASE = BK * SA  # the B tile follows the A tile in the shared buffer
    lines = []
    add = lines.append
    add("def zero_acc(acc):")
    for r in range(TM):
        for c in range(TN):
            add(f"    acc[{r}, {c}] = 0")
    # The k step: per kk, TM + TN shared loads and TM * TN FMAs. Thread (tx, ty) owns rows ty + r TY and columns
    # tx + c TX (strided: a warp reads consecutive words of the B tile and broadcast words of the A tile);
    # U(): unsigned indices, no wraparound select (see operand_value). The
    # kk loop itself stays a loop: written out BK times, the compiler issued every shared load of the step
    # before the first FMA and spilled the registers that took.
    add("def fma_step(acc, smem, ty, tx):")
    add(f"    for kk in range({BK}):")
    add(f"        pa = kk * {SA} + ty")
    add(f"        pb = {B_BASE} + kk * {SB} + tx")
    for r in range(TM):
        add(f"        a{r} = smem[U(pa + {r * TY})]")
    for c in range(TN):
        add(f"        b{c} = smem[U(pb + {c * TX})]")
    for r in range(TM):
        for c in range(TN):
            add(f"        acc[{r}, {c}] += a{r} * b{c}")
    add("def stash_acc(acc, smem, ty, tx):")
    for r in range(TM):
        for c in range(TN):
            add(f"    smem[U((ty + {r * TY}) * {BN} + tx + {c * TX})] = acc[{r}, {c}]")
    # Operand tiles: R * BK elements over T threads; consecutive threads take consecutive addresses of the
    # operand (coalesced): along k when it is contiguous along k (s_k == 1), else along its rows. The pad
    # keeps the transposing stores of the first case free of bank conflicts. Rolled loops: written out, every
    # load's address was hoisted out of the k loop, and the registers they held made the 8 x 8 tile spill.
    LOAD_ARGS = "src, off, s_row, s_k, n_rows, n_k, r0 + r, k0 + kk, gather, order, o_off, ones_row"
    for name, R, base, stride in (("load_a", BM, 0, SA), ("load_b", BN, B_BASE, SB)):
        add(f"def {name}(smem, src, off, s_row, s_k, n_rows, n_k, r0, k0, gather, order, o_off, ones_row, t):")
        add("    if s_k == 1:")
        add(f"        for e in range(t, {R * BK}, {T}):")
        add(f"            kk = e % {BK}")
        add(f"            r = e // {BK}")
        add(f"            smem[U({base} + kk * {stride} + r)] = operand_value({LOAD_ARGS})")
        add("    else:")
        add(f"        for e in range(t, {R * BK}, {T}):")
        add(f"            r = e % {R}")
        add(f"            kk = e // {R}")
        add(f"            smem[U({base} + kk * {stride} + r)] = operand_value({LOAD_ARGS})")
    add("def tile_product(acc, smem, t, i0, j0, k_begin, k_end, M, N, A, a_off, a_si, a_sk, a_gather, a_ones, "
        "B, b_off, b_sj, b_sk, order, o_off):")
    add(f"    tx = t % {TX}")
    add(f"    ty = t // {TX}")
    add("    zero_acc(acc)")
    add(f"    for k0 in range(k_begin, k_end, {BK}):")
    add("        load_a(smem, A, a_off, a_si, a_sk, M, k_end, i0, k0, a_gather, order, o_off, a_ones, t)")
    add("        load_b(smem, B, b_off, b_sj, b_sk, N, k_end, j0, k0, 0, order, o_off, -1, t)")
    add("        cuda.syncthreads()")
    add("        fma_step(acc, smem, ty, tx)")
    add("        cuda.syncthreads()")
    add("    stash_acc(acc, smem, ty, tx)")
    add("    cuda.syncthreads()")
    code = _generated(config, "\n".join(lines) + "\n", {"cuda": cuda, "operand_value": operand_value, "U": np.uint64})
    code["SMEM"] = max(BK * (SA + SB), BM * BN)
    return code


FORWARD = 0  # C = act(A @ B + bias)
BACKWARD_PARAMS = 1  # C = [A.T; 1] @ dout: the weight gradient with the bias gradient as its last row
BACKWARD_INPUT = 2  # C = (dout @ W.T) * act'(aux)


def product_kernel(config: str, dtype=np.float32):
    """The vocabulary's register-tiled product for configuration ``config`` (see PRODUCT_CONFIGS): one kernel
    for the three forms of a dense layer, the form an argument (uniform per launch; the inner loop is
    the same for all three, only the tile loads and the epilogue differ)."""
    BM, BN, _, TM, TN, T, _ = tile_shapes(config)
    code = tile_code(config)
    SMEM = code["SMEM"]
    TILE = BM * BN
    tile_product = code["tile_product"]

    def build():
        @product_jit(config, dtype)
        def _product_kernel(C, E, A, B, order, form, M, N, K, a_si, a_sk, a_ones, b_sj, b_sk, c_ld, e_ld, act):
            # Flat views: C (M * c_ld,) output; A, B the operands (see tile_code: A(i, k) = A[i a_si + k a_sk],
            # B(k, j) = B[j b_sj + k b_sk]); E: bias (N,) (FORWARD), dbias (N,) (BACKWARD_PARAMS: row a_ones of
            # the product goes there) or the previous layer's output (M * e_ld,) (BACKWARD_INPUT); order (1,):
            # unused here (no gather). Block (bx, by) owns C[by BM:(by+1) BM, bx BN:(bx+1) BN].
            smem = cuda.shared.array(SMEM, dtype=C.dtype)
            acc = cuda.local.array((TM, TN), dtype=C.dtype)
            t = cuda.threadIdx.x
            i0 = cuda.blockIdx.y * BM
            j0 = cuda.blockIdx.x * BN
            m_rows = M + 1 if a_ones >= 0 else M
            tile_product(acc, smem, t, i0, j0, 0, K, M, N, A, 0, a_si, a_sk, 0, a_ones, B, 0, b_sj, b_sk, order, 0)
            # Epilogue from the staged tile: consecutive threads write consecutive columns (coalesced).
            for e in range(t, TILE, T):
                i = i0 + e // BN
                j = j0 + e % BN
                if i < m_rows and j < N:
                    v = smem[e]
                    if form == FORWARD:
                        C[i * c_ld + j] = activate(v + E[j], act)
                    elif form == BACKWARD_INPUT:
                        C[i * c_ld + j] = v * activation_grad(E[i * e_ld + j], act)
                    elif i == a_ones:
                        E[j] = v
                    else:
                        C[i * c_ld + j] = v
        return _product_kernel

    return _cached(("product", PRODUCT_CONFIGS[config], np.dtype(dtype).name), build)


_NO_ORDER = {}


def _no_order():
    if "order" not in _NO_ORDER:
        _NO_ORDER["order"] = to_device(np.zeros(1, np.int64))
    return _NO_ORDER["order"]


def _flat(x):
    return x.reshape(x.size) if x.size else x.reshape(0)


def _launch_product(form, C, E, A, B, M, N, K, a_si, a_sk, a_ones, b_sj, b_sk, c_ld, e_ld, act):
    BM, BN, _, _, _, T, _ = tile_shapes(VOCABULARY_CONFIG)
    m_rows = M + (1 if a_ones >= 0 else 0)
    launch(product_kernel(VOCABULARY_CONFIG, C.dtype), (_blocks(N, BN), _blocks(m_rows, BM)), T,
           (_flat(C), _flat(E), _flat(A), _flat(B), _no_order(), form, M, N, K, a_si, a_sk, a_ones, b_sj, b_sk,
            c_ld, e_ld, act))


# --- reference kernels (one thread per output element, serial dot product) -------------------------------
@kernel
def _dense_forward_naive_kernel(out, inp, weight, bias, act):
    # out (B, n_out) = act(inp (B, n_in) @ weight (n_in, n_out) + bias (n_out,)); thread (j, i) owns out[i, j].
    j, i = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        acc = out.dtype.type(0.0)
        for k in range(weight.shape[0]):
            acc += inp[i, k] * weight[k, j]
        out[i, j] = activate(acc + bias[j], act)


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


# --- per-row and per-element kernels -----------------------------------------------------------------------
@strict_kernel
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
                        sqrt_bias_correction2, decay):
    # params, exp_avg, exp_avg_sq, grads (P,): thread i owns element i.
    i = cuda.grid(1)
    if i < params.shape[0]:
        adam_update_one(params, exp_avg, exp_avg_sq, grads, i, lr, beta1, beta2, eps, weight_decay,
                        step_size, sqrt_bias_correction2, decay)


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


# --- array_stats: a grid-wide reduction in two passes ---------------------------------------------------------
@strict_kernel  # fastmath would let the compiler assume no NaN or inf: the very thing checked
def _array_stats_blocks_kernel(counts, extrema, values):
    # counts (G,) int64, extrema (2G,): block b writes counts[b] = the non-finite values of its chunk of
    # values (n,) and extrema[2b], extrema[2b+1] = min and max of its finite ones (+inf, -inf if none). The
    # chunks are contiguous (coalesced); each thread reduces a strided share, then a tree in shared memory.
    # min, max and counts do not depend on the order: the result is exact and deterministic.
    bad = cuda.shared.array(REDUCE_THREADS, dtype=nbtypes.int64)
    low = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    high = cuda.shared.array(REDUCE_THREADS, dtype=values.dtype)
    t = cuda.threadIdx.x
    b = cuda.blockIdx.x
    n = values.shape[0]
    chunk = (n + cuda.gridDim.x - 1) // cuda.gridDim.x
    stop = min(n, (b + 1) * chunk)
    n_bad = 0
    lo = values.dtype.type(np.inf)
    hi = values.dtype.type(-np.inf)
    for r in range(b * chunk + t, stop, REDUCE_THREADS):
        v = values[r]
        if math.isnan(v) or math.isinf(v):
            n_bad += 1
        else:
            lo = min(lo, v)
            hi = max(hi, v)
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
        counts[b] = bad[0]
        extrema[2 * b] = low[0]
        extrema[2 * b + 1] = high[0]


@strict_kernel
def _array_stats_final_kernel(stats, counts, extrema):
    # stats (3,) = [non-finite count, min, max] over the G partial results of _array_stats_blocks_kernel
    # (counts (G,), extrema (2G,)); ONE block of REDUCE_THREADS threads.
    bad = cuda.shared.array(REDUCE_THREADS, dtype=nbtypes.int64)
    low = cuda.shared.array(REDUCE_THREADS, dtype=stats.dtype)
    high = cuda.shared.array(REDUCE_THREADS, dtype=stats.dtype)
    t = cuda.threadIdx.x
    n_bad = 0
    lo = stats.dtype.type(np.inf)
    hi = stats.dtype.type(-np.inf)
    for b in range(t, counts.shape[0], REDUCE_THREADS):
        n_bad += counts[b]
        lo = min(lo, extrema[2 * b])
        hi = max(hi, extrema[2 * b + 1])
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
    launch(_dense_forward_naive_kernel, (_blocks(out.shape[1], bx), _blocks(out.shape[0], by)), (bx, by),
           (out, inp, weight, bias, act))


def dense_backward_params_naive(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout, dbias = dout.sum(0), overwritten. dout (B, n_out) is d loss / d pre-activation."""
    bx, by = BLOCK_2D
    launch(_dense_backward_params_naive_kernel, (_blocks(dweight.shape[1], bx), _blocks(dweight.shape[0] + 1, by)),
           (bx, by), (dweight, dbias, dout, inp))


def dense_backward_input_naive(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten (the previous layer's activation derivative fused)."""
    bx, by = BLOCK_2D
    launch(_dense_backward_input_naive_kernel, (_blocks(dinp.shape[1], bx), _blocks(dinp.shape[0], by)), (bx, by),
           (dinp, dout, weight, inp, inp_act))


def dense_forward(out, inp, weight, bias, act):
    """out = act(inp @ weight + bias), overwritten.
    inp (B, n_in), weight (n_in, n_out), bias (n_out,), out (B, n_out)."""
    B, n_in = inp.shape
    n_out = weight.shape[1]
    _launch_product(FORWARD, out, bias, inp, weight, B, n_out, n_in, n_in, 1, -1, 1, n_out, n_out, 0, act)


def dense_backward_params(dweight, dbias, dout, inp):
    """dweight = inp.T @ dout and dbias = dout.sum(0), overwritten. dout (B, n_out), inp (B, n_in),
    dweight (n_in, n_out), dbias (n_out,). Each thread owns its outputs: no atomics, fixed order."""
    B, n_in = inp.shape
    n_out = dout.shape[1]
    # A = inp.T (n_in, B): A(i, k) = inp[k, i], plus the all-ones row n_in whose product is dbias.
    _launch_product(BACKWARD_PARAMS, dweight, dbias, inp, dout, n_in, n_out, B, 1, n_in, n_in, 1, n_out, n_out, 0, 0)


def dense_backward_input(dinp, dout, weight, inp, inp_act):
    """dinp = (dout @ weight.T) * act'(inp), overwritten: gradient w.r.t. the previous layer's
    pre-activation. dout (B, n_out), weight (n_in, n_out), inp (B, n_in) = previous layer's output."""
    B, n_out = dout.shape
    n_in = weight.shape[0]
    # B operand = weight.T (n_out, n_in): B(k, j) = weight[j, k].
    _launch_product(BACKWARD_INPUT, dinp, inp, dout, weight, B, n_in, n_out, n_out, 1, -1, n_out, 1, n_in, n_in,
                    inp_act)


def dense_backward(dinp, dweight, dbias, dout, inp, weight, inp_act):
    """Both halves of a dense layer's backward pass (see dense_backward_params, dense_backward_input)."""
    dense_backward_params(dweight, dbias, dout, inp)
    dense_backward_input(dinp, dout, weight, inp, inp_act)


def loss_grad(dlogits, row_losses, logits, targets, loss, inv_divisor):
    """Fused loss and gradient, overwritten: dlogits (B, k) = d mean-loss / d logits, row_losses (B,) each
    row's summed loss. logits, targets (B, k); inv_divisor = 1 / loss_divisor(loss, n, k)."""
    launch(_loss_grad_kernel, _blocks(logits.shape[0], BLOCK_1D), BLOCK_1D,
           (dlogits, row_losses, logits, targets, loss, dlogits.dtype.type(inv_divisor)))


def output_transform(out, logits, loss):
    """out (B, k) = the loss's output transform of logits (B, k): identity, sigmoid, softmax or exp."""
    launch(_output_transform_kernel, _blocks(logits.shape[0], BLOCK_1D), BLOCK_1D, (out, logits, loss))


def sgd_update(params, velocity, grads, lr, momentum, dampening, weight_decay, nesterov, first_step):
    """torch.optim.SGD step over flat vectors (P,), in place. Scalars are cast to the parameters' dtype."""
    t = params.dtype.type
    launch(_sgd_update_kernel, _blocks(params.shape[0], BLOCK_1D), BLOCK_1D,
           (params, velocity, grads, t(lr), t(momentum), t(dampening), t(weight_decay), bool(nesterov),
            bool(first_step)))


def adam_update(params, exp_avg, exp_avg_sq, grads, lr, beta1, beta2, eps, weight_decay, step_size,
                sqrt_bias_correction2, decay):
    """torch.optim.Adam (decay = 1) or AdamW (weight_decay = 0, decay = 1 - lr * wd) step over flat vectors
    (P,), in place. Scalars are cast to the parameters' dtype."""
    t = params.dtype.type
    launch(_adam_update_kernel, _blocks(params.shape[0], BLOCK_1D), BLOCK_1D,
           (params, exp_avg, exp_avg_sq, grads, t(lr), t(beta1), t(beta2), t(eps), t(weight_decay), t(step_size),
            t(sqrt_bias_correction2), t(decay)))


def gather_rows(out, source, order, start):
    """out[r] = source[order[start + r]] for r < out.shape[0], overwritten: one mini-batch, contiguous."""
    bx, by = BLOCK_2D
    launch(_gather_rows_kernel, (_blocks(out.shape[1], bx), _blocks(out.shape[0], by)), (bx, by),
           (out, source, order, start))


def sum_into(totals, index, values):
    """totals[index] = values.sum() (values (n,)), computed on the device in a fixed order."""
    launch(_sum_into_kernel, 1, REDUCE_THREADS, (totals, index, values))


def add_into(out, x):
    """out += x over flat vectors (P,)."""
    launch(_add_into_kernel, _blocks(out.shape[0], BLOCK_1D), BLOCK_1D, (out, x))


def array_stats(stats, values):
    """stats (3,) = [count of non-finite values, min, max of the finite ones] of the flat values (n,).

    Two launches: up to STATS_BLOCKS blocks each reduce a contiguous chunk (the whole GPU reads the array at
    memory speed, instead of one block at 1-3 GB/s), then one block reduces their partial results."""
    n_blocks = max(1, min(STATS_BLOCKS, _blocks(values.shape[0], 4 * REDUCE_THREADS)))
    counts = device_empty(n_blocks, np.int64)
    extrema = device_empty(2 * n_blocks, values.dtype)
    launch(_array_stats_blocks_kernel, n_blocks, REDUCE_THREADS, (counts, extrema, values))
    launch(_array_stats_final_kernel, 1, REDUCE_THREADS, (stats, counts, extrema))


# --- what the backend launches, with its argument types (PTX check and resource report) --------------------
# Kernels whose float32 build deliberately computes in float64: the epoch loss (summed in float64 on the
# device, as the CPU does) and nothing else. test_ptx.py allows f64 instructions only in these, and only of
# the kinds an accumulator needs (see F64_ACCUMULATOR_OPS there).
FLOAT64_ACCUMULATORS = {"epoch_end", "loss_sum", "fused_fit"}
# The register-tiled products whose inner loops cuda_report counts (SASS instructions per FFMA).
PRODUCT_KERNELS = ("product_r8", "product_r4", "product_r4s", "step_product_r8", "step_product_r4",
                   "step_product_r4s")


def kernel_signatures(dtype):
    """{kernel name: (kernel, argument types)} for every kernel the backends launch, with float ``dtype``
    (np.float32 or np.float64): C-contiguous arrays, int64 codes and indices, scalars in ``dtype``, bool flags.
    This module's kernels; cuda_report.kernel_signatures adds those of cuda_step and cuda_fused (which import
    this module, so this one never imports them)."""
    f = nbtypes.float32 if np.dtype(dtype) == np.float32 else nbtypes.float64
    m = f[:, ::1]
    v = f[::1]
    i64 = nbtypes.int64
    iv = nbtypes.int64[::1]
    b = nbtypes.boolean
    product = (v, v, v, v, iv) + (i64,) * 12
    signatures = {
        "dense_forward_naive": (_dense_forward_naive_kernel, (m, m, m, v, i64)),
        "dense_backward_params_naive": (_dense_backward_params_naive_kernel, (m, v, m, m)),
        "dense_backward_input_naive": (_dense_backward_input_naive_kernel, (m, m, m, m, i64)),
        "loss_grad": (_loss_grad_kernel, (m, v, m, m, i64, f)),
        "output_transform": (_output_transform_kernel, (m, m, i64)),
        "sgd_update": (_sgd_update_kernel, (v, v, v, f, f, f, f, b, b)),
        "adam_update": (_adam_update_kernel, (v, v, v, v, f, f, f, f, f, f, f, f)),
        "gather_rows": (_gather_rows_kernel, (m, m, iv, i64)),
        "sum_into": (_sum_into_kernel, (v, i64, v)),
        "add_into": (_add_into_kernel, (v, v)),
        "array_stats_blocks": (_array_stats_blocks_kernel, (iv, v, v)),
        "array_stats_final": (_array_stats_final_kernel, (v, iv, v)),
    }
    for setting in PRODUCT_CONFIGS:
        signatures[f"product_{setting}"] = (product_kernel(setting, dtype), product)
    return signatures
