"""fastbp on a busy machine (issue 27, part 1): each unit's time with one core kept busy by another process, as a
ratio to its time on the idle machine, measured in one process with idle and busy rounds alternating.

The units (float32, relu, softmax cross-entropy, SGD):
  predict450    one ``Trainer.predict`` of 450 rows on a 64-128-10 network
  digits_epoch  one epoch of 1797 rows of a 64-128-10 network, batch 32
  w3_epoch      one epoch of 8192 rows of a 784-256-256-10 network, batch 128
"Busy" is another process spinning (``while True: pass``), started before and killed after each busy round.
A job that gets one core of two should take at most twice as long, and the target is 1.5x (the share of the
cores that fair scheduling gives fastbp's two threads against one busy process is 4/3 of a core). The ratio is
reported, not asserted: a shared machine's load moves it. The trainers leave fastbp to choose their threads
(``n_threads=None``: it leaves out cores other processes keep busy); ``python -m dev.busy_machine`` prints the
same table from a clone, and with ``--threads N`` for trainers pinned to N threads; docs/performance.md has the
figures per threading layer.
"""
import statistics
import subprocess
import sys
import time

import numpy as np

from .common import rng

UNITS = ("predict450", "digits_epoch", "w3_epoch")
REPEATS = {"predict450": 100, "digits_epoch": 10, "w3_epoch": 3}  # calls timed per round


def build_units(names, n_threads=None):
    """{name: a call that runs the unit once}, warmed up (compilation or cache load, workspaces); the trainers'
    ``n_threads`` (None: fastbp's choice)."""
    import fastbp

    data = rng()
    units = {}
    if {"predict450", "digits_epoch"} & set(names):
        small = fastbp.Trainer(fastbp.MLP([64, 128, 10], "relu", seed=0), loss="softmax_cross_entropy",
                               batch_size=32, lr=0.01, n_threads=n_threads)
        X = data.standard_normal((1797, 64)).astype(np.float32)
        y = data.integers(0, 10, 1797)
        rows450 = X[:450].copy()
        units["predict450"] = lambda: small.predict(rows450)
        units["digits_epoch"] = lambda: small.fit(X, y, epochs=1)
    if "w3_epoch" in names:
        wide = fastbp.Trainer(fastbp.MLP([784, 256, 256, 10], "relu", seed=0), loss="softmax_cross_entropy",
                              batch_size=128, lr=0.01, n_threads=n_threads)
        X3 = data.standard_normal((8192, 784)).astype(np.float32)
        y3 = data.integers(0, 10, 8192)
        units["w3_epoch"] = lambda: wide.fit(X3, y3, epochs=1)
    units = {name: units[name] for name in names}
    for run in units.values():
        run()
    return units


def _round_median(run, repeats) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _start_spinner() -> subprocess.Popen:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # let it start and take its core
    return spinner


def measure(units, rounds: int) -> dict:
    """{name: (idle seconds, busy seconds)}: medians over ``rounds`` of each round's median, idle and busy rounds
    alternating so that a slow spell of a shared machine hits both states alike."""
    seen = {(name, state): [] for name in units for state in ("idle", "busy")}
    for _ in range(rounds):
        for state in ("idle", "busy"):
            spinner = _start_spinner() if state == "busy" else None
            try:
                for name, run in units.items():
                    run()
                    seen[(name, state)].append(_round_median(run, REPEATS[name]))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
                    time.sleep(0.1)
    return {name: (statistics.median(seen[(name, "idle")]), statistics.median(seen[(name, "busy")]))
            for name in units}


class BusyMachine:
    params = (list(UNITS),)
    param_names = ["unit"]
    timeout = 300

    def setup(self, unit):
        self.units = build_units([unit])

    def track_busy_slowdown(self, unit):
        idle, busy = measure(self.units, rounds=3)[unit]
        return busy / idle

    track_busy_slowdown.unit = "busy / idle"
