"""Resource report of every CUDA kernel: registers, shared memory, stack and spills, and the SASS
instructions per FFMA of each product kernel's inner loop, all without a GPU.

    python -m dev.cuda_report [--arch sm_90] [--dtype float32 float64] [--max-registers N]
                              [--max-sass-per-fma 6] [--json FILE] [--ptx-dir DIR]

A development tool (run it from the repository's root): it lives in dev/, outside the installed package.

Each kernel is compiled to PTX with the signatures the backend launches (``kernel_signatures`` below)
and assembled by ``ptxas -v`` (from a CUDA toolkit: PATH, $CUDA_HOME/bin or /usr/local/cuda/bin). For the
register-tiled products (``kernels.cuda.PRODUCT_KERNELS``) the assembled code is disassembled with
``nvdisasm`` (the CUDA toolkit's, or pip's ``nvidia-cuda-nvdisasm``) and the innermost loop with the most
FFMA instructions is counted: all its instructions / its FFMAs (float64: DFMA). Exits 1 when any kernel
spills registers to local memory, uses more than ``--max-registers``, or has a float32 product loop above
``--max-sass-per-fma`` instructions per FMA (6 by default: the FMA-bound target; the first tiled kernels
had 20.25; float64's DFMA loops are reported, not held to it), so a regression shows up in CI on a machine
without a GPU. Without nvdisasm the SASS column is skipped with a message (and fails only with
``--require-sass``, as CI runs it). Needs numba-cuda and NVRTC (``pip install 'fastbp[ptx]'``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from fastbp.kernels import cuda as kernels
from fastbp.kernels import cuda_fused, cuda_step

_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"Used \d+ registers.*?(\d+) bytes smem")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_FMA = re.compile(r"^(?:@!?U?P\w+\s+)?(FFMA|DFMA)\b")
_SHARED_LOAD = re.compile(r"^(?:@!?U?P\w+\s+)?LDS\b")



def kernel_signatures(dtype) -> dict:
    """{kernel name: (kernel, argument types)} for every kernel the backends launch with float ``dtype``: those
    of kernels.cuda, kernels.cuda_step and kernels.cuda_fused (see kernels.cuda.kernel_signatures)."""
    signatures = kernels.kernel_signatures(dtype)
    f = kernels.nbtypes.float32 if np.dtype(dtype) == np.float32 else kernels.nbtypes.float64
    signatures.update(cuda_step.kernel_signatures(f))
    signatures.update(cuda_fused.kernel_signatures(f))
    return signatures


def compile_ptx(name: str, dtype, cc=(9, 0)) -> str:
    """PTX of kernel ``name`` for ``dtype`` and compute capability ``cc``; needs no GPU (NVRTC and NVVM only)."""
    kernels.check_can_compile()
    kern, argtypes = kernel_signatures(dtype)[name]
    options = kern.targetoptions  # as the kernel's own decorator says
    ptx, _ = kernels.cuda.compile_ptx(kern.py_func, argtypes, cc=cc, fastmath=bool(options.get("fastmath", False)),
                                      launch_bounds=options.get("launch_bounds"))
    return ptx

def _wheel_tools(name: str) -> list[str]:
    # pip's nvidia-* wheels put their tools in nvidia/<cuXX>/bin (nvidia-cuda-nvcc: ptxas, nvidia-cuda-nvdisasm:
    # nvdisasm).
    try:
        import nvidia
    except ImportError:
        return []
    return [path for root in nvidia.__path__ for path in sorted(glob.glob(os.path.join(root, "*", "bin", name)))]


def _tool(name: str, first=(), last=()) -> str | None:
    candidates = [*first, shutil.which(name)]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", name))
    candidates.extend(last)
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_ptxas() -> str | None:
    """ptxas from pip's nvidia-cuda-nvcc wheel (the [ptx] extra) first, then PATH or a CUDA toolkit. The wheel
    comes first because it matches the nvidia-nvvm wheel of the same extra: NVVM 13.5 writes PTX ISA 9.5, which
    a CUDA 13.0 ptxas on PATH refuses ("Unsupported .version 9.5; current version is '9.0'")."""
    return _tool("ptxas", first=_wheel_tools("ptxas"))


def find_nvdisasm() -> str | None:
    """nvdisasm from PATH, a CUDA toolkit, or pip's nvidia-cuda-nvdisasm wheel (nvidia/cu13/bin)."""
    return _tool("nvdisasm", last=_wheel_tools("nvdisasm"))


def _assemble(ptxas: str, ptx: str, arch: str, out: str | None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", out or os.devnull],
                                capture_output=True, text=True, check=False)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed ({result.returncode}):\n{text}")
    return text


def kernel_resources(ptxas: str, ptx: str, arch: str, cubin: str | None = None) -> dict:
    """{registers, smem, stack, spill_stores, spill_loads} of the one entry in ``ptx``, from ``ptxas -v``
    (the assembled code is kept in ``cubin`` when given)."""
    text = _assemble(ptxas, ptx, arch, cubin)
    used, frame, smem = _USED.search(text), _FRAME.search(text), _SMEM.search(text)
    if used is None or frame is None:
        raise RuntimeError(f"unexpected ptxas output:\n{text}")
    return dict(registers=int(used.group(1)), smem=int(smem.group(1)) if smem else 0, stack=int(frame.group(1)),
                spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))


def inner_fma_loop(sass: str) -> dict | None:
    """{instructions, fma} of the product's inner loop in the disassembly ``sass``: of the innermost loops (a
    backward branch's target..branch, containing no other loop), the one with the most FFMA/DFMA fed from
    shared memory (score min(FMAs, 4 x LDS): an epilogue loop's exp polynomial has FMAs but one shared load);
    None when no loop has an FMA."""
    instructions, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        insn = _INSTRUCTION.match(line)
        if insn:
            instructions.append(insn.group(1).strip())
    for pos, text in enumerate(instructions):
        branch = _BRANCH.search(text)
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= pos:
            loops.append((labels[branch.group(1)], pos))
    best = None
    for start, end in loops:
        if any((s, e) != (start, end) and start <= s and e <= end for s, e in loops):
            continue  # not innermost
        body = instructions[start:end + 1]
        fma = sum(1 for text in body if _FMA.match(text))
        score = min(fma, 4 * sum(1 for text in body if _SHARED_LOAD.match(text)))
        if fma and (best is None or (score, fma) > (best["score"], best["fma"])):
            best = dict(instructions=len(body), fma=fma, score=score)
    return best


def sass_per_fma(nvdisasm: str, cubin: str) -> dict | None:
    sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    return inner_fma_loop(sass)


def ptx_file_name(name: str, dtype, cc) -> str:
    """The file a kernel's PTX is kept in by ``FASTBP_PTX_DIR=DIR pytest tests/cuda/test_ptx.py`` and read
    from by ``--ptx-dir DIR``: ``<kernel>-<dtype>-sm_<cc>.ptx``."""
    return f"{name}-{np.dtype(dtype).name}-sm_{cc[0]}{cc[1]}.ptx"


def report(arch: str = "sm_90", dtypes=("float32", "float64"), sass: bool = True, ptx_dir=None) -> list[dict]:
    """One row per kernel and dtype (see the module notes). ``ptx_dir``: a folder of PTX files named by
    ptx_file_name, used where present instead of compiling again (CI's PTX check writes them: numba-cuda
    takes about 2 s a kernel, ptxas a fraction of that)."""
    ptxas = find_ptxas()
    if ptxas is None:
        raise FileNotFoundError("ptxas not found: install a CUDA toolkit (nvcc's ptxas) and put it on PATH, "
                                "or set CUDA_HOME")
    nvdisasm = find_nvdisasm() if sass else None
    digits = arch.removeprefix("sm_").rstrip("af")  # sm_90 -> (9, 0), sm_100 -> (10, 0)
    cc = (int(digits[:-1]), int(digits[-1]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        for dtype in dtypes:
            for name in kernel_signatures(np.dtype(dtype)):
                kept = ptx_dir and os.path.join(ptx_dir, ptx_file_name(name, dtype, cc))
                if kept and os.path.exists(kept):
                    with open(kept) as f:
                        ptx = f.read()
                else:
                    ptx = compile_ptx(name, np.dtype(dtype), cc)
                row = dict(kernel=name, dtype=dtype, **kernel_resources(ptxas, ptx, arch, cubin))
                if nvdisasm and name in kernels.PRODUCT_KERNELS:
                    loop = sass_per_fma(nvdisasm, cubin)
                    if loop:
                        row.update(loop_instructions=loop["instructions"], loop_fma=loop["fma"],
                                   sass_per_fma=loop["instructions"] / loop["fma"])
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'kernel':<30} {'dtype':<8} {'regs':>5} {'smem B':>7} {'stack B':>8} {'spill st':>9} "
              f"{'spill ld':>9} {'SASS/FMA':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['sass_per_fma']:.2f}" if "sass_per_fma" in r else "-"
        lines.append(f"{r['kernel']:<30} {r['dtype']:<8} {r['registers']:>5} {r['smem']:>7} {r['stack']:>8} "
                     f"{r['spill_stores']:>9} {r['spill_loads']:>9} {ratio:>9}")
    return "\n".join(lines)


def problems(rows, max_registers=None, max_sass_per_fma=6.0, expect_sass=True) -> list[str]:
    found = [f"{r['kernel']} ({r['dtype']}) spills {r['spill_stores']} B / {r['spill_loads']} B"
             for r in rows if r["spill_stores"] or r["spill_loads"]]
    found += [f"{r['kernel']} ({r['dtype']}) uses a {r['stack']} B stack frame (local memory)"
              for r in rows if r["stack"] and r["kernel"] in kernels.PRODUCT_KERNELS]
    if max_registers is not None:
        found += [f"{r['kernel']} ({r['dtype']}) uses {r['registers']} registers > {max_registers}"
                  for r in rows if r["registers"] > max_registers]
    for r in rows:  # the FMA-bound target is float32's (FFMA); float64 must not spill, its DFMA loop is reported
        if r["kernel"] not in kernels.PRODUCT_KERNELS or not expect_sass or r["dtype"] != "float32":
            continue
        if "sass_per_fma" not in r:
            found.append(f"{r['kernel']} ({r['dtype']}): no FMA loop found in its SASS")
        elif r["sass_per_fma"] > max_sass_per_fma:
            found.append(f"{r['kernel']} ({r['dtype']}) inner loop: {r['sass_per_fma']:.2f} SASS instructions per "
                         f"FMA > {max_sass_per_fma}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="ptxas target (default sm_90)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--max-registers", type=int, default=None,
                        help="fail when a kernel uses more registers than this")
    parser.add_argument("--max-sass-per-fma", type=float, default=6.0,
                        help="fail when a product kernel's inner loop has more SASS instructions per FMA")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--require-sass", action="store_true",
                        help="fail when nvdisasm is missing instead of skipping the SASS counts (CI)")
    parser.add_argument("--ptx-dir", default=None, metavar="DIR",
                        help="read each kernel's PTX from DIR where the PTX check left it "
                             "(FASTBP_PTX_DIR=DIR pytest tests/cuda/test_ptx.py) instead of compiling it again")
    args = parser.parse_args(argv)
    nvdisasm = find_nvdisasm()
    if nvdisasm is None:
        print("nvdisasm not found (pip install 'nvidia-cuda-nvdisasm==13.*', or a CUDA toolkit): SASS counts "
              "skipped", file=sys.stderr)
        if args.require_sass:
            return 1
    rows = report(args.arch, args.dtype, ptx_dir=args.ptx_dir)
    configs = ", ".join(f"{name}={shape}" for name, shape in kernels.PRODUCT_CONFIGS.items())
    print(f"fastbp CUDA kernels on {args.arch} (products {configs}; fastmath={kernels.FASTMATH})")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    found = problems(rows, args.max_registers, args.max_sass_per_fma, expect_sass=nvdisasm is not None)
    for problem in found:
        print("REGRESSION:", problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
