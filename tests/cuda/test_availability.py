"""device="cuda" / "auto" decisions, checked in fresh processes (no GPU, simulator or numba-cuda needed)."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import sys
{block}
import fastbp
from fastbp.backends import cuda_unavailable_reason
print(fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", device="auto").device)
try:
    fastbp.Trainer(fastbp.MLP([2, 1]), loss="mse", device="cuda")
    print("cuda ok")
except RuntimeError as error:
    print(error)
print("numba.cuda imported" if "numba.cuda" in sys.modules else "numba.cuda not imported")
"""


def run(block="", **env):
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"} | env
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(block=block)], capture_output=True, text=True,
                            env=environment, timeout=120, check=True)
    return result.stdout.splitlines()


def test_without_numba_cuda_the_cpu_works_and_cuda_says_how_to_fix():
    lines = run("sys.modules['numba_cuda'] = None  # as if the cuda extra were not installed")
    assert lines[0] == "cpu"
    assert "device='cuda' cannot be used" in lines[1] and "pip install -e '.[cuda]'" in lines[1]
    assert lines[2] == "numba.cuda not imported"


def test_simulator_counts_as_a_usable_device():
    pytest.importorskip("numba_cuda")
    lines = run(NUMBA_ENABLE_CUDASIM="1")
    assert lines[:2] == ["cuda", "cuda ok"]
