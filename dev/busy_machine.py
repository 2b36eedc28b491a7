"""fastbp on a busy machine: each unit's time with the other core idle and with one core kept busy, as a ratio.

    python -m dev.busy_machine [--rounds 7] [--units predict450,digits_epoch,w3_epoch] [--threads N]

The units and the method are asv_benchmarks/bench_busy.py's (its docstring says what each unit is): idle and busy
rounds alternate in this one process, and each figure is the median over rounds of a round's median. The first
line names the threading layer numba picked (fastbp._threads says why fastbp prefers tbb) and the thread count;
compare layers by running it again with ``NUMBA_THREADING_LAYER=omp``. The trainers leave fastbp to choose their
threads (it leaves out cores other processes keep busy: fastbp._threads.CoreShare); ``--threads N`` pins them to
N, to compare with that choice. Run it from the repository's root.
"""
from __future__ import annotations

import argparse
import sys

from asv_benchmarks.bench_busy import UNITS, build_units, measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--units", default=",".join(UNITS))
    parser.add_argument("--threads", type=int, default=None,
                        help="pin the trainers to this many threads (default: fastbp's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    names = [name.strip() for name in args.units.split(",") if name.strip()]
    unknown = sorted(set(names) - set(UNITS))
    if unknown:
        parser.error(f"--units: unknown {unknown}; choose from {', '.join(UNITS)}")
    import numba

    from fastbp import _threads

    results = measure(build_units(names, args.threads), args.rounds)
    threads = (f"trainers pinned to {args.threads} threads" if args.threads is not None else
               f"up to {numba.get_num_threads()} threads, busy cores left out")
    print(f"threading layer {_threads.threading_layer()}, {threads}, {args.rounds} rounds")
    for name, (idle, busy) in results.items():
        print(f"{name:13s} idle {idle * 1e3:9.3f} ms   one core busy {busy * 1e3:9.3f} ms   {busy / idle:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
