"""Every CUDA kernel compiled to PTX with the signatures the backend launches (float32 and float64), for
cc 9.0 and cc 7.5: the type check the simulator cannot do. Needs NVRTC (nvidia-cuda-nvrtc) and libNVVM,
no GPU. Runs in its own process WITHOUT the simulator (compile_ptx does not work in a simulator process):
``FASTBP_PTX_CHECK=1 python -m pytest tests/cuda/test_ptx.py`` (a few minutes: the generated product
kernels are large). The main test run skips it unless FASTBP_PTX_CHECK=1."""
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
# Double-precision arithmetic, conversions to double, or double registers: none may appear in float32 code,
# except in the kernels that sum the epoch loss in float64 (kernels.cuda.FLOAT64_ACCUMULATORS), and there
# only the instructions an accumulator needs: widen a float32 row loss, add, divide by the divisor, compare
# (isfinite, the target loss), move, load and store. No float64 multiply, FMA or math, no narrowing.
F64 = re.compile(r"\.f64\b|%fd\d")
F64_ACCUMULATOR_OPS = re.compile(r"^(cvt\.f64\.f32|add\.f64|div\.rn\.f64|abs\.f64|setp\.\w+\.f64|mov\.f64|"
                                 r"ld\.(global|shared)\.f64|st\.(global|shared)\.f64)$")


def kernel_names():
    if not HAVE_CUDA_EXTRA or SIMULATOR:
        return []
    from dev import cuda_report

    return sorted(cuda_report.kernel_signatures(np.float32))


def _f64_instructions(ptx):
    return sorted({line.split()[0] for line in ptx.splitlines() if F64.search(line)
                   and not line.strip().startswith((".", "//"))})


@pytest.mark.parametrize("cc", ARCHS, ids=lambda cc: f"sm_{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", kernel_names())
def test_kernel_compiles_to_ptx(name, dtype, cc):
    from fastbp.kernels import cuda as kernels
    from dev import cuda_report

    ptx = cuda_report.compile_ptx(name, dtype, cc)
    keep = os.environ.get("FASTBP_PTX_DIR")  # CI's resource report reads them (cuda_report --ptx-dir)
    if keep:
        os.makedirs(keep, exist_ok=True)
        path = os.path.join(keep, cuda_report.ptx_file_name(name, dtype, cc))
        with open(path + ".partial", "w") as f:
            f.write(ptx)
        os.replace(path + ".partial", path)
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert ".entry" in ptx
    if dtype == np.float32:
        ops = _f64_instructions(ptx)
        if name in kernels.FLOAT64_ACCUMULATORS:
            assert "add.f64" in ops and "cvt.f64.f32" in ops  # the deliberate float64 sum is there
            assert all(F64_ACCUMULATOR_OPS.match(op) for op in ops), \
                f"{name} float32 PTX has float64 instructions beyond the loss accumulator: {ops}"
        else:
            assert not ops, f"{name} float32 PTX has float64 instructions: {ops[:5]}"
    elif name not in ("epoch_begin", "gather_rows", "array_stats_final"):
        assert ".f64" in ptx  # the float64 kernels really compute in double


def test_every_kernel_is_checked():
    """Each kernel the backends can launch is in kernel_signatures, so nothing goes unchecked: the
    module-level ones of the three kernel modules, and those built per launch setting (all of whose
    builders kernel_signatures calls)."""
    from dev import cuda_report
    from fastbp.kernels import cuda as kernels
    from fastbp.kernels import cuda_fused, cuda_step

    checked = {kern.py_func for dtype in (np.float32, np.float64)  # some are built per dtype
               for kern, _ in cuda_report.kernel_signatures(dtype).values()}
    defined = {getattr(module, name).py_func for module in (kernels, cuda_step, cuda_fused) for name in dir(module)
               if name.endswith("_kernel") and hasattr(getattr(module, name), "py_func")}
    assert defined <= checked
    built = {kern.py_func for key, kern in kernels._built.items() if key[0] != "tile_code"
             for kern in (kern if isinstance(kern, tuple) else (kern,))}
    assert built <= checked


def test_compiling_with_numpy_2_5_says_how_to_fix(monkeypatch):
    from fastbp.kernels import cuda as kernels
    from dev import cuda_report

    monkeypatch.setattr(np, "__version__", "2.5.0")
    with pytest.raises(RuntimeError, match=r"pip install 'numpy<2.5'"):
        cuda_report.compile_ptx("add_into", np.float32)
    assert "numpy<2.5" in kernels.unavailable_reason()
