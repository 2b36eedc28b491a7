"""fastbp's main demo: the seed regression and the digits classifier on the CPU, with timings.

Runs examples/seed_regression.py (Y = 2X + noise fitted by a 1-16-1 sigmoid network, 3000 full-batch epochs)
and examples/digits.py (scikit-learn's 8x8 digits, a 64-128-10 relu network, 20 epochs), and prints their
losses, the digits' held-out accuracy, and how long each part took. Every timing says how much of it was
compiling: the first run on a machine compiles fastbp's kernels (a one-line notice on stderr says so while it
happens; docs/performance.md has the figures), later runs load them from numba's disk cache and take a
few seconds in all.

    python examples/demo.py [--device cpu]
"""
import argparse
import time

import digits
import seed_regression

import fastbp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where to train (default: cpu)")
    args = parser.parse_args(argv)

    started, compiled_before = time.perf_counter(), fastbp.compile_seconds()
    print("== Seed regression: Y = 2X + noise, 1-16-1 sigmoid network ==")
    seed_regression.main(["--device", args.device])
    print("\n== Digits: 64-128-10 relu network, softmax cross-entropy ==")
    digits.main(["--device", args.device])
    seconds, compiled = time.perf_counter() - started, fastbp.compile_seconds() - compiled_before
    print(f"\ndemo finished in {seconds:.1f} s ({seed_regression.compile_note(compiled)})")


if __name__ == "__main__":
    main()
