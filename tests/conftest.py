import os

import numpy as np
import pytest

# A cold first call shares its compiling with a helper process where a core would otherwise wait (fastbp._jit,
# "compile sessions"). Under pytest-xdist with a worker per CPU no core waits: each worker's helpers only compete
# with the other workers, and two workers' helpers compile the same leaves at once. One process per worker then
# (measured with the README's test command, AMD EPYC Zen 4, 2 vCPUs, 2 workers: 249.6 -> 220.9 s, 424 -> 395 s
# of CPU); the tests of the helpers set the variable for the processes they start. Set before fastbp is imported:
# its import starts a standby helper where helpers are allowed (fastbp._standby).
# (fastbp._standby.usable_cpus, written out: importing it would import fastbp)
USABLE_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= USABLE_CPUS:
    os.environ.setdefault("FASTBP_COMPILE_PROCESSES", "1")

# Per-dtype tolerances for comparisons with the float64 reference: float32 sums of a few hundred terms.
TOLERANCES = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_xdist_auto_num_workers(config):
    """Workers for ``pytest -n auto`` (pytest-xdist): one per CPU, at most 4. Most of the suite's time is numba
    compiling, once per worker for what several of its tests share, and each worker holds its own compiled code
    (a few hundred MB): past 4 workers more CPUs mostly compile the same kernels again."""
    return max(1, min(4, USABLE_CPUS))


# Hypothesis: modest example counts by default so the whole suite stays fast on two cores; no deadline (the
# first example of a test may compile kernels). HYPOTHESIS_PROFILE=thorough runs many more.
try:
    from hypothesis import settings

    settings.register_profile("fastbp", max_examples=20, deadline=None, print_blob=True)
    settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastbp"))
except ImportError:  # hypothesis is a test extra; the property tests skip themselves without it
    pass

# The one-line compile notice (fastbp._compile_notice) goes to stderr in whichever test first compiles for more
# than a second, which depends on the state of the kernel cache: tests that read stderr must not see it.
# tests/test_compile_notice.py runs its own processes without this setting.
os.environ.setdefault("FASTBP_QUIET_COMPILE", "1")
