"""Resource report of every CUDA kernel: registers, shared memory, stack and spills, without a GPU.

    python -m fastbp.kernels.cuda_report [--arch sm_90] [--dtype float32 float64] [--max-registers N]

Each kernel is compiled to PTX with the signatures the trainer launches (``kernels.cuda.kernel_signatures``)
and assembled by ``ptxas -v`` (from a CUDA toolkit: PATH, $CUDA_HOME/bin or /usr/local/cuda/bin). Prints
one table row per kernel and dtype. Exits 1 when any kernel spills registers to local memory or uses more
than ``--max-registers``, so a regression in the kernels shows up in CI on a machine without a GPU.
Needs numba-cuda and NVRTC (``pip install 'fastbp[ptx]'``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from . import cuda as kernels

_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def find_ptxas() -> str | None:
    candidates = [shutil.which("ptxas")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "ptxas"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def kernel_resources(ptxas: str, ptx: str, arch: str) -> dict:
    """{registers, smem, stack, spill_stores, spill_loads} of the one entry in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                                capture_output=True, text=True, check=False)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed ({result.returncode}):\n{text}")
    used, frame = _USED.search(text), _FRAME.search(text)
    if used is None or frame is None:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return dict(registers=int(used.group(1)), smem=int(used.group(2) or 0), stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def report(arch: str = "sm_90", dtypes=("float32", "float64")) -> list[dict]:
    ptxas = find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("ptxas not found: install a CUDA toolkit (nvcc's ptxas) and put it on PATH, "
                                "or set CUDA_HOME")
    digits = arch.removeprefix("sm_").rstrip("af")  # sm_90 -> (9, 0), sm_100 -> (10, 0)
    cc = (int(digits[:-1]), int(digits[-1]))
    rows = []
    for dtype in dtypes:
        for name in kernels.kernel_signatures(np.dtype(dtype)):
            ptx = kernels.compile_ptx(name, np.dtype(dtype), cc)
            rows.append(dict(kernel=name, dtype=dtype, **kernel_resources(ptxas, ptx, arch)))
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'kernel':<30} {'dtype':<8} {'regs':>5} {'smem B':>7} {'stack B':>8} {'spill st':>9} {'spill ld':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['kernel']:<30} {r['dtype']:<8} {r['registers']:>5} {r['smem']:>7} {r['stack']:>8} "
                     f"{r['spill_stores']:>9} {r['spill_loads']:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="ptxas target (default sm_90)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--max-registers", type=int, default=None,
                        help="fail when a kernel uses more registers than this")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.dtype)
    print(f"fastbp CUDA kernels on {args.arch} (TILE={kernels.TILE}, REDUCE_THREADS={kernels.REDUCE_THREADS}, "
          f"fastmath={kernels.FASTMATH})")
    print(format_table(rows))
    problems = [f"{r['kernel']} ({r['dtype']}) spills {r['spill_stores']} B / {r['spill_loads']} B"
                for r in rows if r["spill_stores"] or r["spill_loads"]]
    if args.max_registers is not None:
        problems += [f"{r['kernel']} ({r['dtype']}) uses {r['registers']} registers > {args.max_registers}"
                     for r in rows if r["registers"] > args.max_registers]
    for problem in problems:
        print("REGRESSION:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
