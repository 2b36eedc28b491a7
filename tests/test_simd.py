"""fastbp.kernels.simd: every vector operation against numpy, for both dtypes, at this CPU's width and (in
subprocesses) at the other widths it can run: 128 bits (NUMBA_CPU_NAME=generic), 256 (haswell) and 512
(FASTBP_SIMD_BITS=512, which LLVM splits into narrower registers where the CPU has no zmm)."""
import ctypes
import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

from fastbp.kernels import simd

DTYPES = [np.float32, np.float64]


# --- compiled probes: each applies one operation to arrays, so numpy can check it ---------------------------------
@njit
def _load_store(out, a, src, dst):
    simd.store(out, dst, simd.load(a, src))


@njit
def _load_partial(out, a, src, count):
    simd.store(out, 0, simd.load_partial(a, src, count))


@njit
def _store_partial(out, a, dst, count):
    simd.store_partial(out, dst, simd.load(a, 0), count)


@njit
def _broadcasts(out, a, offset):
    simd.store(out, 0, simd.broadcast(a[offset]))
    simd.store(out, simd.lanes(a), simd.broadcast_load(a, offset))
    simd.store(out, 2 * simd.lanes(a), simd.zero(a))


@njit
def _arithmetic(out, x, y, z):
    L = simd.lanes(x)
    a = simd.load(x, 0)
    b = simd.load(y, 0)
    c = simd.load(z, 0)
    simd.store(out, 0, simd.fma(a, b, c))
    simd.store(out, L, simd.add(a, b))
    simd.store(out, 2 * L, simd.sub(a, b))
    simd.store(out, 3 * L, simd.mul(a, b))
    simd.store(out, 4 * L, simd.max(a, b))
    simd.store(out, 5 * L, simd.select_gt(a, b, c, b))


@njit
def _reduce(a):
    v = simd.load(a, 0)
    return simd.hsum(v), simd.extract(v, simd.lanes(a) - 1), simd.lanes(a)


@njit
def _two_d(out, a, row, col):
    # 2-D arrays are addressed by element offset in memory order: a[row, col] is at row * a.shape[1] + col.
    simd.store(out, row * out.shape[1] + col, simd.load(a, row * a.shape[1] + col))


@njit
def _transposed(out, a, offset, stride):
    columns = simd.load_transposed(a, offset, stride)
    for k in range(simd.lanes(a)):
        simd.store(out, k * simd.lanes(a), columns[k])


def _pairwise_sum(values):
    # The fixed order hsum promises: lanes t and t + n/2 added, then again on the halves.
    v = np.asarray(values)
    while v.size > 1:
        v = v[: v.size // 2] + v[v.size // 2:]
    return v[0]


def check_all_operations(dtype):
    """Every operation against numpy for ``dtype`` at this process's width (plain asserts, so a subprocess at
    another width can run it too)."""
    rng = np.random.default_rng(7)
    L = simd.lanes_for(dtype)
    n = 4 * L + 3
    a = rng.normal(size=n).astype(dtype)
    # load/store at offsets that are not multiples of the width (unaligned), including the last whole vector
    for src in (0, 1, L - 1, L, L + 3, n - L):
        for dst in (0, 3, n - L):
            out = np.full(n, np.nan, dtype)
            _load_store(out, a, src, dst)
            expected = np.full(n, np.nan, dtype)
            expected[dst:dst + L] = a[src:src + L]
            np.testing.assert_array_equal(out, expected)
    for count in range(L + 1):
        for src in (0, 5, n - count):
            out = np.full(L, np.nan, dtype)
            _load_partial(out, a, src, count)
            np.testing.assert_array_equal(out, np.concatenate([a[src:src + count], np.zeros(L - count, dtype)]))
        for dst in (0, 1, n - L):
            out = np.full(n, np.nan, dtype)
            _store_partial(out, a, dst, count)
            expected = np.full(n, np.nan, dtype)
            expected[dst:dst + count] = a[:count]
            np.testing.assert_array_equal(out, expected)  # lanes past count left untouched (still nan)
    out = np.full(3 * L, np.nan, dtype)
    _broadcasts(out, a, 5)
    np.testing.assert_array_equal(out, np.concatenate([np.full(2 * L, a[5]), np.zeros(L)]).astype(dtype))

    x = rng.normal(size=L).astype(dtype)
    y = rng.normal(size=L).astype(dtype)
    z = rng.normal(size=L).astype(dtype)
    x[0], y[1] = np.nan, np.nan  # nan in either operand
    if L > 2:
        x[2] = y[2] = 1.0  # a tie
    out = np.empty(6 * L, dtype)
    _arithmetic(out, x, y, z)
    exact_fma = (np.longdouble(x) * np.longdouble(y) + np.longdouble(z)).astype(dtype)
    np.testing.assert_allclose(out[:L], exact_fma, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).tiny)
    np.testing.assert_array_equal(out[L:2 * L], x + y)
    np.testing.assert_array_equal(out[2 * L:3 * L], x - y)
    np.testing.assert_array_equal(out[3 * L:4 * L], x * y)
    # max(x, y) = x where x > y else y: y when x is nan, nan when y is (as pointwise's relu: nan -> 0)
    np.testing.assert_array_equal(out[4 * L:5 * L], np.where(x > y, x, y))
    np.testing.assert_array_equal(out[5 * L:], np.where(x > y, z, y))

    total, last, lanes = _reduce(a)
    assert lanes == L
    assert last == a[L - 1]
    assert total == _pairwise_sum(a[:L])  # exactly this order, in the dtype (numpy adds dtype arrays in it)
    np.testing.assert_allclose(total, a[:L].astype(np.float64).sum(), rtol=1e-5)

    # load_transposed: an L x L block of a wider matrix, from an offset that is not a multiple of L
    wide = rng.normal(size=(L + 2, L + 5)).astype(dtype)
    out = np.full(L * L, np.nan, dtype)
    _transposed(out, wide, 1 * (L + 5) + 3, L + 5)
    np.testing.assert_array_equal(out.reshape(L, L), wide[1:1 + L, 3:3 + L].T)

    m = rng.normal(size=(3, 2 * L + 1)).astype(dtype)
    out = np.full_like(m, np.nan)
    _two_d(out, m, 2, 1)
    expected = np.full_like(m, np.nan)
    expected[2, 1:1 + L] = m[2, 1:1 + L]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_every_operation_at_this_width(dtype):
    check_all_operations(dtype)


def test_lane_counts_follow_the_width():
    assert simd.VECTOR_BITS in (128, 256, 512)
    assert simd.lanes_for(np.float32) == simd.VECTOR_BITS // 32
    assert simd.lanes_for(np.float64) == simd.VECTOR_BITS // 64


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_width_matches_this_cpu():
    flags = _cpu_flags()
    if flags is None or os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES") or (
            os.environ.get("FASTBP_SIMD_BITS")):
        pytest.skip("not a Linux x86 host with the default target")
    expected = 512 if "avx512f" in flags else 256 if "avx" in flags else 128
    assert simd.VECTOR_BITS == expected, simd.VECTOR_BITS_REASON


def _run(code, **env):
    environment = dict(os.environ, **env)
    for name in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "FASTBP_SIMD_BITS"):
        if name not in env:
            environment.pop(name, None)
    environment["PYTHONPATH"] = os.pathsep.join([os.getcwd(), environment.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


X86 = _cpu_flags() is not None and "sse2" in _cpu_flags()


@pytest.mark.skipif(not X86, reason="x86 CPU names")
@pytest.mark.parametrize("env, bits", [
    (dict(NUMBA_CPU_NAME="generic"), 128),  # SSE2 only: the 4-lane float32 / 2-lane float64 fallback
    (dict(NUMBA_CPU_NAME="haswell"), 256),  # the AVX2 path, even on an AVX-512 host
    (dict(FASTBP_SIMD_BITS="512"), 512),  # 16 lanes: split into ymm pairs where there is no zmm
], ids=["generic-128", "haswell-256", "forced-512"])
def test_every_operation_at_other_widths(env, bits, tmp_path):
    flags = _cpu_flags()
    if bits == 256 and not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU cannot run AVX2 code")
    out = _run(f"""
        import numpy as np
        from fastbp.kernels import simd
        from tests.test_simd import check_all_operations
        assert simd.VECTOR_BITS == {bits}, (simd.VECTOR_BITS, simd.VECTOR_BITS_REASON)
        check_all_operations(np.float32)
        check_all_operations(np.float64)
        print("ok", simd.lanes_for(np.float32), simd.HAS_FMA)
    """, NUMBA_CACHE_DIR=str(tmp_path), **env)
    assert out.split()[:2] == ["ok", str(bits // 32)]


@pytest.mark.skipif(not X86, reason="x86 assembly")
def test_avx512_target_emits_zmm_fma(tmp_path):
    # Zen 3 cannot run zmm code: compile for an AVX-512 CPU in a subprocess and only read its assembly.
    out = _run("""
        import numpy as np
        from numba import njit, float32, float64, intp, types
        from fastbp.kernels import simd
        @njit
        def kernel(out, a, b, n):
            acc = simd.zero(a)
            for k in range(n):
                acc = simd.fma(simd.broadcast_load(a, k), simd.load(b, k * simd.lanes(b)), acc)
            simd.store(out, 0, acc)
        for t in (float32, float64):
            kernel.compile((t[::1], t[::1], t[::1], intp))
        for sig in kernel.signatures:
            asm = kernel.inspect_asm(sig)
            assert "zmm" in asm and "vfmadd231p" in asm, asm[-4000:]
            assert any(("vfmadd231ps" in l or "vfmadd231pd" in l) and "zmm" in l for l in asm.splitlines())
        print(simd.VECTOR_BITS)
    """, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="skylake-avx512",
        NUMBA_CPU_FEATURES="+avx512f,+avx512dq,+avx512bw,+avx512vl,+avx2,+avx,+fma,+f16c,+bmi2")
    assert out.strip() == "512"


def test_partial_load_reads_nothing_past_count(tmp_path):
    # The masked load must not touch the element after ``count``: put the data at the very end of a page
    # followed by an unreadable page (a plain load of the whole vector would fault there).
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = mmap.mmap(-1, 2 * page)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert libc.mprotect(ctypes.c_void_p(address + page), page, 0) == 0  # PROT_NONE
    try:
        for dtype in DTYPES:
            itemsize = np.dtype(dtype).itemsize
            L = simd.lanes_for(dtype)
            data = np.frombuffer(buffer, dtype, count=page // itemsize)  # the readable page
            tail = L - 1
            data[-tail:] = np.arange(1, tail + 1)
            out = np.full(L, np.nan, dtype)
            _load_partial(out, data, data.shape[0] - tail, tail)
            np.testing.assert_array_equal(out, np.concatenate([np.arange(1, tail + 1), [0]]).astype(dtype))
            del data
    finally:
        libc.mprotect(ctypes.c_void_p(address + page), page, 3)  # PROT_READ | PROT_WRITE, before unmapping
        buffer.close()


def test_mismatched_types_fail_at_compile_time():
    from numba.core.errors import TypingError

    @njit
    def mixed(a, b):
        return simd.hsum(simd.add(simd.load(a, 0), simd.load(b, 0)))

    with pytest.raises(TypingError, match="vectors of one type"):
        mixed(np.zeros(16, np.float32), np.zeros(16, np.float64))


# --- views of flat buffers ------------------------------------------------------------------------------------
@njit
def _matrix_probe(a, offset, n_rows, n_cols):
    return simd.matrix(a, offset, n_rows, n_cols)


@njit
def _flat_probe(a):
    return simd.flat(a)


@njit
def _view_of_a_new_array(n):
    # the source array dies here: only the view's reference keeps its memory alive (NRT)
    return simd.matrix(np.arange(n, dtype=np.float64), 2, 3, 4)


@njit(_nrt=False)
def _sum_of_views_without_nrt(a, n_rows, n_cols):
    total = 0.0
    for offset in range(a.shape[0] - n_rows * n_cols + 1):
        total += simd.matrix(a, offset, n_rows, n_cols)[n_rows - 1, n_cols - 1] + simd.flat(a)[offset]
    return total


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_matrix_and_flat_are_the_reshape_views(dtype):
    a = np.arange(40, dtype=dtype)
    for offset, n_rows, n_cols in [(0, 4, 10), (3, 5, 7), (39, 1, 1), (7, 0, 5), (7, 3, 0)]:
        view = _matrix_probe(a, offset, n_rows, n_cols)
        expected = a[offset:offset + n_rows * n_cols].reshape(n_rows, n_cols)
        assert view.shape == expected.shape and view.flags.c_contiguous and view.dtype == dtype
        np.testing.assert_array_equal(view, expected)
        if view.size:
            assert np.shares_memory(view, a)
    _matrix_probe(a, 3, 2, 2)[1, 1] = -1  # writes reach the buffer
    assert a[6] == -1
    m = a.reshape(5, 8)
    np.testing.assert_array_equal(_flat_probe(m), a)
    assert np.shares_memory(_flat_probe(m), a)
    read_only = a.copy()
    read_only.flags.writeable = False
    assert not _matrix_probe(read_only, 1, 2, 3).flags.writeable and not _flat_probe(read_only).flags.writeable
    np.testing.assert_array_equal(_view_of_a_new_array(20), np.arange(2.0, 14.0).reshape(3, 4))
    assert _sum_of_views_without_nrt(a.astype(np.float64), 2, 3) == sum(a[o + 5] + a[o] for o in range(35))


def test_views_need_a_contiguous_buffer():
    from numba.core.errors import TypingError

    with pytest.raises(TypingError, match="1-D C-contiguous"):
        _matrix_probe(np.zeros((4, 4)), 0, 2, 2)
    with pytest.raises(TypingError, match="C-contiguous"):
        _flat_probe(np.zeros((4, 4))[:, ::2])
