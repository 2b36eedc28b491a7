"""fastbp's main demo: the seed regression and the digits classifier on the CPU, with timings.

    python examples/demo.py
"""
import time

import seed_regression
import digits

if __name__ == "__main__":
    started = time.perf_counter()
    print("== Seed regression: Y = 2X + noise, 1-16-1 sigmoid network ==")
    seed_regression.main([])
    print("\n== Digits: 64-128-10 relu network, softmax cross-entropy ==")
    digits.main([])
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s (compilation included; cached for next time)")
