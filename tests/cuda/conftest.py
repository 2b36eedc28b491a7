"""CUDA tests. Kernel and backend tests run on a GPU or in numba's simulator (NUMBA_ENABLE_CUDASIM=1, its
own pytest process: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) and skip otherwise; the PTX
check (test_ptx.py) runs in a process WITHOUT the simulator. Launch sizes are shrunk once per session so
the tiny inputs span several blocks, with a partial one (the settings size shared and local arrays and are
compile-time constants on a GPU: they are set before the first launch and never changed back)."""
import importlib.util
import os
import sys

import pytest

HAVE_CUDA_EXTRA = importlib.util.find_spec("numba_cuda") is not None
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"

# Short on purpose (pytest -ra prints it per test group); cuda_reason() says the whole why.
SKIP_REASON = "no usable GPU and no simulator (run with NUMBA_ENABLE_CUDASIM=1)"

# Product tiles: (BM, BN, BK, TM, TN). Three different register tiles (4 x 4 on 4 threads, 2 x 2 on 16, 2 x 2
# on 4), each tile smaller than the test shapes.
SMALL_LAUNCHES = {
    "cuda": dict(PRODUCT_CONFIGS={"r8": (8, 8, 4, 4, 4), "r4": (8, 8, 4, 2, 2), "r4s": (4, 4, 2, 2, 2)},
                 BLOCK_2D=(4, 3), BLOCK_1D=8, REDUCE_THREADS=8, STATS_BLOCKS=3),
    # Launch plans: 32 x 32-style tiles ("r4s") and split-K as soon as a grid has fewer than 4 / 4 tiles.
    "cuda_step": dict(TAIL_ROWS=3, TAIL_THREADS=4, EPOCH_THREADS=8, REDUCE_THREADS=8, LARGE_GRID_TILES=4,
                      SPLIT_TARGET=4, MIN_SPLIT_STEPS=1),
    "cuda_fused": dict(FUSED_THREADS=8),
}


def cuda_reason():
    """Why the CUDA kernels cannot run in this process (None when a GPU or the simulator is active)."""
    if not HAVE_CUDA_EXTRA:
        return "numba-cuda is not installed (pip install 'fastbp[cuda]')"
    from fastbp.kernels import cuda as kernels

    return kernels.unavailable_reason()


@pytest.fixture(scope="session")
def small_launches():
    from fastbp.kernels import cuda, cuda_fused, cuda_step

    for module in (cuda, cuda_step, cuda_fused):
        for name, value in SMALL_LAUNCHES[module.__name__.rsplit(".", 1)[1]].items():
            setattr(module, name, value)
    return cuda


@pytest.fixture
def cuda_kernels(small_launches):
    return small_launches


@pytest.fixture(scope="session", autouse=True)
def fast_simulator():
    """The simulator runs a block's threads as Python threads and polls them in a loop: each barrier waits
    for Python's thread switch interval (5 ms by default). 50 us makes a barrier about 8x cheaper."""
    if not SIMULATOR:
        yield
        return
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(interval)


def pytest_configure(config):
    # CI and the GPU script set FASTBP_REQUIRE_CUDA=1: a run that would silently skip every CUDA test fails.
    if os.environ.get("FASTBP_REQUIRE_CUDA") == "1" and cuda_reason() is not None:
        pytest.exit(f"FASTBP_REQUIRE_CUDA=1 but the CUDA kernels cannot run: {cuda_reason()}", returncode=3)
