"""CUDA tests. Kernel and trainer tests run on a GPU or in numba's simulator (NUMBA_ENABLE_CUDASIM=1, its
own pytest process: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) and skip otherwise; the PTX
check (test_ptx.py) runs in a process WITHOUT the simulator. Launch sizes are shrunk once per session so
the tiny inputs span several blocks, with a partial one (TILE and REDUCE_THREADS size shared arrays and
are compile-time constants on a GPU: they are set before the first launch and never changed back)."""
import importlib.util
import os

import pytest

HAVE_CUDA_EXTRA = importlib.util.find_spec("numba_cuda") is not None
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"

# Short on purpose (pytest -ra prints it per test group); cuda_reason() says the whole why.
SKIP_REASON = "no usable GPU and no simulator (run with NUMBA_ENABLE_CUDASIM=1)"

SMALL_LAUNCHES = dict(TILE=4, BLOCK_2D=(4, 3), BLOCK_1D=8, REDUCE_THREADS=8)


def cuda_reason():
    """Why the CUDA kernels cannot run in this process (None when a GPU or the simulator is active)."""
    if not HAVE_CUDA_EXTRA:
        return "numba-cuda is not installed (pip install 'fastbp[cuda]')"
    from fastbp.kernels import cuda as kernels

    return kernels.unavailable_reason()


@pytest.fixture(scope="session")
def small_launches():
    from fastbp.kernels import cuda as kernels

    for name, value in SMALL_LAUNCHES.items():
        setattr(kernels, name, value)
    return kernels


@pytest.fixture
def cuda_kernels(small_launches):
    return small_launches


def pytest_configure(config):
    # CI and the GPU script set FASTBP_REQUIRE_CUDA=1: a run that would silently skip every CUDA test fails.
    if os.environ.get("FASTBP_REQUIRE_CUDA") == "1" and cuda_reason() is not None:
        pytest.exit(f"FASTBP_REQUIRE_CUDA=1 but the CUDA kernels cannot run: {cuda_reason()}", returncode=3)
