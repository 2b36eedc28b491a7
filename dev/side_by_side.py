"""Time two or more checkouts of fastbp side by side, in one run, as ratios to the first.

    python -m dev.side_by_side --trees OLD NEW [NEW2 ...] [--rounds 5] [--units W1,W2,predict1]

Each tree is a checkout (``git worktree add ../old <commit>``). This machine is shared and noisy, so the
trees take turns: every round runs one fresh child process per tree (PYTHONPATH = that tree, so it imports
that tree's fastbp), in an order that rotates from round to round, and each unit's figure is the median over
the rounds of the child's own median. A slow spell then hits every tree alike instead of whichever ran
during it. The ratio column is first-tree time / other-tree time: above 1 means the other tree is faster.

The units (``fastbp.bench.WORKLOADS`` defines W1-W4; every tree since the benchmarks landed has them):
  W1..W4        one timed unit of the workload (W1: a 1000-epoch fit; W2-W4: one epoch), as ``bench``
  predict1      one ``Trainer.predict`` of one row on W2's network (per-call overhead of the public API)
  fit1_overhead one ``Trainer.fit`` of one epoch on 8 rows of W1's network (per-call overhead of fit)
Compilation is excluded (a warm-up call precedes each unit); NUMBA_CACHE_DIR is shared by the rounds, and an
untimed warm-up round first runs every tree's units and waits for the compile helpers its child started to finish
their lists. Without it, a tree's first timed round shared the CPU with its helper still compiling the product
engine's optional worker and region in the background (2026-12-07: a one-row predict read 0.66x and a W3 epoch
0.94x that way, both 0.98-1.18x once the cache was warm).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

UNITS = ("W1", "W2", "W3", "W4", "predict1", "fit1_overhead")

# What a child runs, in the tree's own fastbp. Only public API that every compared tree has.
CHILD = r"""
import json, sys, time
import numpy as np
import fastbp
from fastbp.bench import WORKLOADS, linear_init, make_data

def median_time(run, repeats):
    run()  # warm-up: compilation, workspaces
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))

def trainer_for(name, **overrides):
    spec = dict(WORKLOADS[name], **overrides)
    weights, biases = linear_init(spec["sizes"])
    model = fastbp.MLP(spec["sizes"], spec["activation"], seed=0)
    for layer in range(len(weights)):
        model.weights[layer][...] = weights[layer]
        model.biases[layer][...] = biases[layer]
    trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=spec["batch_size"], seed=0)
    return spec, model, trainer

results = {}
for unit in sys.argv[1].split(","):
    if unit in WORKLOADS:
        spec, model, trainer = trainer_for(unit)
        X, y = make_data(unit)
        repeats = 3 if unit in ("W3", "W4") else 7
        results[unit] = median_time(lambda: trainer.fit(X, y, epochs=spec["epochs"]), repeats)
    elif unit == "predict1":
        spec, model, trainer = trainer_for("W2")
        row = make_data("W2")[0][:1].copy()
        calls = 2000
        results[unit] = median_time(lambda: [trainer.predict(row) for _ in range(calls)], 5) / calls
    elif unit == "fit1_overhead":
        spec, model, trainer = trainer_for("W1")
        X, y = make_data("W1")
        X, y = X[:8].copy(), y[:8].copy()
        calls = 200
        results[unit] = median_time(lambda: [trainer.fit(X, y, epochs=1) for _ in range(calls)], 5) / calls
    else:
        raise SystemExit(f"unknown unit {unit!r}")
results["fastbp_file"] = fastbp.__file__
if "--warm-up" in sys.argv:  # wait for the compile helpers this process started (fastbp._jit's, where it has them)
    from fastbp import _jit
    for helper in list(getattr(_jit, "_helpers", {}).values()) + list(getattr(_jit, "_retired", [])):
        helper.process.wait()
print("RESULT " + json.dumps(results))
"""


def run_child(tree: str, units: list[str], env: dict, warm_up: bool = False) -> dict:
    child_env = dict(env, PYTHONPATH=os.path.abspath(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, ",".join(units)] + (["--warm-up"] if warm_up else []),
                          cwd=tree, env=child_env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    imported = os.path.realpath(result.pop("fastbp_file"))
    if not imported.startswith(os.path.realpath(tree) + os.sep):  # an installed fastbp shadowed the tree's
        raise SystemExit(f"{tree}: the child imported {imported}, not this tree's fastbp")
    return result


def _format_seconds(seconds: float) -> str:
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {suffix}"
    return f"{seconds * 1e9:.3g} ns"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, help="checkouts to compare; the first is the base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--units", default=",".join(UNITS), help=f"comma-separated subset of {','.join(UNITS)}")
    args = parser.parse_args(argv)
    units = args.units.split(",")
    unknown = sorted(set(units) - set(UNITS))
    if unknown:
        parser.error(f"--units: unknown {unknown}; expected a subset of {list(UNITS)}")
    if len(args.trees) < 2:
        parser.error(f"--trees: expected at least two checkouts, got {len(args.trees)}")
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fastbp-side-by-side-cache"))
    samples = {tree: {unit: [] for unit in units} for tree in args.trees}
    for tree in args.trees:
        run_child(tree, units, env, warm_up=True)
        print(f"warm-up {tree}: done", flush=True)
    for round_index in range(args.rounds):
        shift = round_index % len(args.trees)
        for tree in args.trees[shift:] + args.trees[:shift]:
            result = run_child(tree, units, env)
            for unit in units:
                samples[tree][unit].append(result[unit])
            print(f"round {round_index} {tree}: " + " ".join(f"{u} {_format_seconds(result[u])}" for u in units),
                  flush=True)
    base = args.trees[0]
    print(f"\nmedian over {args.rounds} rounds; ratio = {base} time / tree time (> 1: faster than {base})")
    print(f"{'unit':>14}" + "".join(f"{os.path.basename(os.path.normpath(t)):>22}" for t in args.trees))
    for unit in units:
        medians = [statistics.median(samples[t][unit]) for t in args.trees]
        cells = [f"{_format_seconds(medians[0]):>22}"]
        cells += [f"{_format_seconds(m) + f' ({medians[0] / m:.2f}x)':>22}" for m in medians[1:]]
        print(f"{unit:>14}" + "".join(cells))
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
