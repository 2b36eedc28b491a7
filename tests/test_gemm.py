"""fastbp.kernels.gemm: the engine's three products (gemm.product, the product fastbp.kernels.cpu's
vocabulary and drivers run) and the vocabulary's naive references against a float64 numpy reference
(tests/naive.py), at tile edges, for both dtypes and every activation; 1 and 2 threads bit-identical; the
other vector widths in subprocesses."""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from fastbp.kernels import cpu, gemm, simd
from fastbp.kernels.pointwise import ACTIVATIONS

from . import naive
from .conftest import TOLERANCES

MR = gemm.TILE_ROWS
NR32 = gemm.tile_columns(np.float32)
# (rows, n_in, n_out): 1s, primes, and each side of the tile edges (MR rows, NR columns, one vector).
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 2), (MR, 3, NR32), (MR + 1, 13, NR32 + 1), (2 * MR - 1, 17, NR32 - 1),
          (13, 64, 2 * NR32 + 5), (37, 11, 10)]


def _data(rng, dtype, *shape):
    return rng.normal(size=shape).astype(dtype)


def _workspace(batch, n_in, n_out, dtype):
    # nan-filled: a kernel that read workspace it did not write first would show it.
    return np.full(gemm.workspace_size(batch, n_in, n_out, dtype), np.nan, dtype)


def _forward_reference(inp, w, b, act):
    return naive.ACTIVATIONS[act](inp.astype(np.float64) @ w.astype(np.float64) + b)


# The engine's three products, as the vocabulary calls them (operands with contiguous rows, a workspace of
# workspace_size elements).
def forward(out, inp, w, b, act, panels):
    gemm.product(gemm.FORWARD, act, out, inp, w, b, out, panels)


def weight_grad(dweight, dbias, dout, inp, panels):
    gemm.product(gemm.WEIGHT_GRAD, ACTIVATIONS["identity"], dweight, inp, dout, dbias, dweight, panels)


def input_grad(dinp, dout, w, y, act, panels):
    gemm.product(gemm.INPUT_GRAD, act, dinp, dout, w, panels, y, panels)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_forward(shape, act, dtype, rng):
    B, n_in, n_out = shape
    inp, w, b = _data(rng, dtype, B, n_in), _data(rng, dtype, n_in, n_out), _data(rng, dtype, n_out)
    expected = _forward_reference(inp, w, b, act)
    out = np.full((B, n_out), np.nan, dtype)  # kernels overwrite: a nan left behind would fail
    forward(out, inp, w, b, ACTIVATIONS[act], _workspace(B, n_in, n_out, dtype))
    np.testing.assert_allclose(out, expected, **TOLERANCES[dtype])
    out_naive = np.full((B, n_out), np.nan, dtype)
    cpu.dense_forward_naive(out_naive, inp, w, b, ACTIVATIONS[act])
    np.testing.assert_allclose(out_naive, expected, **TOLERANCES[dtype])


def test_forward_reads_weights_from_flat_parameters(rng):
    # The layout drivers use: weight and bias as views of one flat vector (fastbp.layout).
    from fastbp.layout import Layout

    layout = Layout.from_sizes([13, 29, 3])
    params = rng.normal(size=layout.n_params).astype(np.float32)
    w, b = layout.views(params, 0)
    inp = _data(rng, np.float32, 9, 13)
    out = np.empty((9, 29), np.float32)
    forward(out, inp, w, b, ACTIVATIONS["relu"], _workspace(9, 13, 29, np.float32))
    np.testing.assert_allclose(out, _forward_reference(inp, w, b, "relu"), **TOLERANCES[np.float32])


# The weight gradient packs inp^T for a long batch or rows a page apart, and reads it as stored otherwise.
PACKED_A_SHAPES = [(gemm.PACK_BROADCAST_MIN_BATCH + 5, 9, 2 * NR32 + 5), (7, 1031, 3 * NR32)]


@pytest.mark.parametrize("shape", SHAPES + PACKED_A_SHAPES, ids=str)
def test_dense_backward_params(shape, dtype, rng):
    B, n_in, n_out = shape
    inp, dout = _data(rng, dtype, B, n_in), _data(rng, dtype, B, n_out)
    expected_w = inp.astype(np.float64).T @ dout
    expected_b = dout.astype(np.float64).sum(0)
    for kernel, extra in ((weight_grad, (_workspace(B, n_in, n_out, dtype),)),
                          (cpu.dense_backward_params_naive, ())):
        dweight, dbias = np.full((n_in, n_out), np.nan, dtype), np.full(n_out, np.nan, dtype)
        kernel(dweight, dbias, dout, inp, *extra)
        np.testing.assert_allclose(dweight, expected_w, **TOLERANCES[dtype])
        np.testing.assert_allclose(dbias, expected_b, **TOLERANCES[dtype])


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dense_backward_input(shape, act, dtype, rng):
    B, n_in, n_out = shape
    z_prev = rng.normal(size=(B, n_in))
    inp = naive.ACTIVATIONS[act](z_prev).astype(dtype)  # the previous layer's output
    w, dout = _data(rng, dtype, n_in, n_out), _data(rng, dtype, B, n_out)
    grad = (dout.astype(np.float64) @ w.astype(np.float64).T)
    y = inp.astype(np.float64)
    if act in ("sigmoid", "tanh"):  # the kernels differentiate the rounded output; so does this
        expected = grad * (y * (1 - y) if act == "sigmoid" else 1 - y * y)
    else:
        expected = grad * naive.DERIVATIVES[act](z_prev)
    for kernel, extra in ((input_grad, (_workspace(B, n_in, n_out, dtype),)),
                          (cpu.dense_backward_input_naive, ())):
        dinp = np.full((B, n_in), np.nan, dtype)
        kernel(dinp, dout, w, inp, ACTIVATIONS[act], *extra)
        np.testing.assert_allclose(dinp, expected, **TOLERANCES[dtype])


# --- threads ------------------------------------------------------------------------------------------------------
def _all_kernels(dtype, rng, B, n_in, n_out, act=None):
    """Outputs of gemm.product's three products on one problem (big enough for the parallel path): the forward
    with sigmoid and the input gradient with relu, or both with ``act``. Its tiled worker and parallel region are
    compiled into their slots (a test that wants one empty empties it after)."""
    product = gemm.product
    gemm.task_by_symbol.fill(numba.from_dtype(dtype))
    gemm.parallel_tasks.fill(numba.from_dtype(dtype))
    inp, w, b = _data(rng, dtype, B, n_in), _data(rng, dtype, n_in, n_out), _data(rng, dtype, n_out)
    dout = _data(rng, dtype, B, n_out)
    y = np.abs(_data(rng, dtype, B, n_in)) if act is None else rng.uniform(-1, 1, (B, n_in)).astype(dtype)
    P = _workspace(B, n_in, n_out, dtype)
    out = np.full((B, n_out), np.nan, dtype)
    product(gemm.FORWARD, ACTIVATIONS[act or "sigmoid"], out, inp, w, b, out, P)
    dweight, dbias = np.full((n_in, n_out), np.nan, dtype), np.full(n_out, np.nan, dtype)
    product(gemm.WEIGHT_GRAD, ACTIVATIONS["identity"], dweight, inp, dout, dbias, dweight, P)
    dinp = np.full((B, n_in), np.nan, dtype)
    product(gemm.INPUT_GRAD, ACTIVATIONS[act or "relu"], dinp, dout, w, P, y, P)
    return out, dweight, dbias, dinp


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
# (300, 64, 256): the weight gradient reads inp^T packed (batch > PACK_BROADCAST_MIN_BATCH) and splits its columns
# between the tasks, so the packing of inp^T is shared (a task that only packs, then the tiles).
@pytest.mark.parametrize("shape", [(130, 97, 257), (MR * 40 + 1, 300, NR32 * 5 + 3), (3, 1100, 700), (515, 301, 10),
                                   (300, 64, 256)], ids=str)
def test_one_and_two_threads_bit_identical(shape, dtype):
    B, n_in, n_out = shape
    assert B * n_in * n_out >= gemm.PARALLEL_MIN_WORK  # the parallel path runs on 2 threads
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = _all_kernels(dtype, np.random.default_rng(3), B, n_in, n_out)
        numba.set_num_threads(2)
        parallel = _all_kernels(dtype, np.random.default_rng(3), B, n_in, n_out)
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    # and right: the forward against numpy
    rng = np.random.default_rng(3)
    inp, w, bias = _data(rng, dtype, B, n_in), _data(rng, dtype, n_in, n_out), _data(rng, dtype, n_out)
    np.testing.assert_allclose(serial[0], _forward_reference(inp, w, bias, "sigmoid"), **TOLERANCES[dtype])
    dout = _data(rng, dtype, B, n_out)  # and the weight gradient against numpy (the shared packings feed it)
    np.testing.assert_allclose(parallel[1], inp.astype(np.float64).T @ dout, **TOLERANCES[dtype])
    np.testing.assert_allclose(parallel[2], dout.astype(np.float64).sum(axis=0), **TOLERANCES[dtype])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("shape", [(130, 97, 257), (300, 64, 256)], ids=str)
def test_the_drivers_product_gives_the_same_numbers_before_its_parallel_region_is_compiled(shape, dtype,
                                                                                            monkeypatch):
    """gemm.product runs every product on the calling thread while its optional parallel region
    (gemm.parallel_tasks) is not in its slot (a cold process, until the compile helper has compiled it), in
    parallel once it is: the same numbers either way."""
    B, n_in, n_out = shape
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        parallel = _all_kernels(dtype, np.random.default_rng(3), B, n_in, n_out)
        # emptied: a call through it would raise (_jit: "was called before it was compiled")
        monkeypatch.setattr(gemm.parallel_tasks._slots[numba.from_dtype(dtype)], "value", None)
        serial = _all_kernels(dtype, np.random.default_rng(3), B, n_in, n_out)
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(parallel, serial):
        np.testing.assert_array_equal(a, b)


# Shapes where the tiles take each of their paths: a row tile and a panel, tile edges, a narrow last panel
# (515, 301, 10), inp^T packed for the weight gradient (300, 64, 256), the parallel split (130, 97, 257).
PLAIN_SHAPES = SHAPES + [(130, 97, 257), (300, 64, 256), (515, 301, 10), (9, 70, 130)]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=str)
def test_the_plain_product_gives_the_numbers_of_the_tiles(shape, act, dtype, monkeypatch):
    """gemm.product (the drivers') runs the plain product while the tiled worker (gemm.task_by_symbol, optional)
    is not in its slot (a cold process, until the compile helper has compiled it), and for a forward of fewer
    rows than a tile always: bit for bit the numbers of the tiles (the worker in its slot) for every
    kind and activation, so that a fit gives the same numbers whenever the worker arrives, and a row predicted
    alone those it gets in a batch. The parallel region is in its slot: the product must not take it without the
    worker."""
    B, n_in, n_out = shape
    f = numba.from_dtype(dtype)
    gemm.task_by_symbol.fill(f)
    gemm.parallel_tasks.fill(f)
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(2 if numba.config.NUMBA_NUM_THREADS >= 2 else 1)
        tiles = _all_kernels(dtype, np.random.default_rng(5), B, n_in, n_out, act=act)
        monkeypatch.setattr(gemm.task_by_symbol._slots[f], "value", None)  # emptied (a call through it raises)
        plain = _all_kernels(dtype, np.random.default_rng(5), B, n_in, n_out, act=act)
    finally:
        numba.set_num_threads(previous)
    for name, a, b in zip(("forward", "weight gradient", "bias gradient", "input gradient"), tiles, plain):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # and right: the forward against numpy
    rng = np.random.default_rng(5)
    inp, w, bias = _data(rng, dtype, B, n_in), _data(rng, dtype, n_in, n_out), _data(rng, dtype, n_out)
    np.testing.assert_allclose(plain[0], _forward_reference(inp, w, bias, act), **TOLERANCES[dtype])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_a_fit_gives_the_same_numbers_whether_or_not_the_tiled_worker_has_arrived(activation, monkeypatch):
    """A cold process fits on the plain product until the compile helper delivers the tiled worker: the
    parameters and predictions must not depend on when that happens (the drivers' products, end to end)."""
    import fastbp

    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 32)).astype(np.float32)
    y = rng.integers(0, 5, 300)

    def fitted():
        trainer = fastbp.Trainer(fastbp.MLP([32, 64, 64, 5], activation, seed=0), loss="softmax_cross_entropy",
                                 optimizer="adam", lr=1e-2, batch_size=32, seed=0)
        trainer.fit(X, y, epochs=3)
        return trainer.model.flat_parameters(), trainer.predict(X)

    f = numba.types.float32
    gemm.task_by_symbol.fill(f)
    tiles = fitted()
    monkeypatch.setattr(gemm.task_by_symbol._slots[f], "value", None)
    plain = fitted()
    for a, b in zip(tiles, plain):
        np.testing.assert_array_equal(a, b)


# --- the other vector widths ----------------------------------------------------------------------------------------
BATTERY = """
    import numpy as np
    from fastbp.kernels import gemm, simd
    from tests.test_gemm import _battery
    assert simd.VECTOR_BITS == {bits}, (simd.VECTOR_BITS, simd.VECTOR_BITS_REASON)
    _battery()
    print("ok", gemm.TILE_ROWS, gemm.tile_columns(np.float32))
"""


def _battery():
    """The engine at edge shapes, for subprocess widths: gemm.product (the tile shape, packing and epilogues
    live there) in its three kinds (float32) and the forward (float64), against numpy. One compile per dtype
    (generic-128 run: 21 s when it ran each public kernel and naive reference)."""
    rng = np.random.default_rng(11)
    nr = gemm.tile_columns(np.float32)
    for B, n_in, n_out in [(1, 3, 2), (gemm.TILE_ROWS + 1, 13, nr + 3), (2 * gemm.TILE_ROWS + 3, 40, 2 * nr - 1)]:
        for dtype, act in ((np.float32, "sigmoid"), (np.float64, "relu")):
            inp, w, b = _data(rng, dtype, B, n_in), _data(rng, dtype, n_in, n_out), _data(rng, dtype, n_out)
            out = np.full((B, n_out), np.nan, dtype)
            forward(out, inp, w, b, ACTIVATIONS[act], _workspace(B, n_in, n_out, dtype))
            np.testing.assert_allclose(out, _forward_reference(inp, w, b, act), **TOLERANCES[dtype])
        inp, dout, w = (_data(rng, np.float32, *shape) for shape in ((B, n_in), (B, n_out), (n_in, n_out)))
        dweight, dbias = np.full((n_in, n_out), np.nan, np.float32), np.full(n_out, np.nan, np.float32)
        weight_grad(dweight, dbias, dout, inp, _workspace(B, n_in, n_out, np.float32))
        np.testing.assert_allclose(dweight, inp.astype(np.float64).T @ dout, **TOLERANCES[np.float32])
        np.testing.assert_allclose(dbias, dout.astype(np.float64).sum(0), **TOLERANCES[np.float32])
        y = np.tanh(rng.normal(size=(B, n_in))).astype(np.float32)  # the previous layer's output
        dinp = np.full((B, n_in), np.nan, np.float32)
        input_grad(dinp, dout, w, y, ACTIVATIONS["tanh"], _workspace(B, n_in, n_out, np.float32))
        expected = (dout.astype(np.float64) @ w.astype(np.float64).T) * (1 - y.astype(np.float64) ** 2)
        np.testing.assert_allclose(dinp, expected, **TOLERANCES[np.float32])


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# The AVX2 path (NUMBA_CPU_NAME=haswell: 4 x 24 tiles) is not in this list: CI's cpu_paths step runs this whole
# file, test_simd.py and test_narrow.py compiled for haswell, a superset of the battery (.ci/steps/cpu_paths.sh).
@pytest.mark.parametrize("env, bits", [
    (dict(FASTBP_SIMD_BITS="512"), 512),  # the AVX-512 tile shape (6 x 64), on ymm pairs where there is no zmm
    (dict(NUMBA_CPU_NAME="generic"), 128),  # the SSE2 fallback
], ids=["forced-512", "generic-128"])
def test_other_widths(env, bits, tmp_path):
    if "sse2" not in _cpu_flags():
        pytest.skip("x86 CPU names")
    if os.environ.get("NUMBA_CPU_NAME"):  # CI's cpu_paths step: the run on the host's own CPU checked these
        pytest.skip("NUMBA_CPU_NAME is set: the other widths are checked by a run for the host's own CPU")
    if bits == simd.VECTOR_BITS and not simd.VECTOR_BITS_FORCED and "FASTBP_SIMD_BITS" in env:
        pytest.skip(f"this CPU's own width is {bits} bits: the rest of this file runs that tile shape natively")
    environment = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
                                                                    "FASTBP_SIMD_BITS")}
    environment.update(env, NUMBA_CACHE_DIR=str(tmp_path),
                       PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(BATTERY.format(bits=bits))], env=environment,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows, columns = result.stdout.split()[1:3]
    assert (int(rows), int(columns)) == ((6, 64) if bits == 512 else (4, 3 * bits // 32))
