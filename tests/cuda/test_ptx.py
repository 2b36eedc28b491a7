"""Every CUDA kernel compiled to PTX with the signatures the trainer launches (float32 and float64), for
cc 9.0 and cc 7.5: the type check the simulator cannot do. Needs NVRTC (nvidia-cuda-nvrtc) and libNVVM,
no GPU. Runs in its own process WITHOUT the simulator (compile_ptx does not work in a simulator process):
``FASTBP_PTX_CHECK=1 python -m pytest tests/cuda/test_ptx.py`` (about a minute: 56 compilations). The
main test run skips it unless FASTBP_PTX_CHECK=1."""
import os
import re

import numpy as np
import pytest

from .conftest import HAVE_CUDA_EXTRA, SIMULATOR

pytestmark = [
    pytest.mark.skipif(not HAVE_CUDA_EXTRA, reason="numba-cuda is not installed (pip install 'fastbp[ptx]')"),
    pytest.mark.skipif(SIMULATOR, reason="compile_ptx does not work in a simulator process"),
    pytest.mark.skipif(os.environ.get("FASTBP_PTX_CHECK") != "1",
                       reason="the PTX check runs in its own process: "
                              "FASTBP_PTX_CHECK=1 pytest tests/cuda/test_ptx.py"),
]

ARCHS = [(9, 0), (7, 5)]
# Double-precision arithmetic, conversions to double, or double registers: none may appear in float32 code.
F64 = re.compile(r"\.f64\b|%fd\d")


def kernel_names():
    if not HAVE_CUDA_EXTRA or SIMULATOR:
        return []
    from fastbp.kernels import cuda as kernels

    return sorted(kernels.kernel_signatures(np.float32))


@pytest.mark.parametrize("cc", ARCHS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", kernel_names())
def test_kernel_compiles_to_ptx(name, dtype, cc):
    from fastbp.kernels import cuda as kernels

    ptx = kernels.compile_ptx(name, dtype, cc)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if dtype == np.float32:
        hits = sorted({line.strip() for line in ptx.splitlines() if F64.search(line)})
        assert not hits, f"{name} float32 PTX has float64 instructions: {hits[:5]}"
    else:
        assert ".f64" in ptx  # the float64 kernels really compute in double


def test_every_launcher_has_a_checked_kernel():
    """Each public launcher's kernel is in kernel_signatures, so nothing the trainer launches goes unchecked."""
    from fastbp.kernels import cuda as kernels

    checked = {kern.py_func for kern, _ in kernels.kernel_signatures(np.float32).values()}
    defined = {getattr(kernels, name).py_func for name in dir(kernels) if name.endswith("_kernel")}
    assert defined == checked
