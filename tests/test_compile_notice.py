"""A call that compiles fastbp's kernels for more than a second says so once, in one line on stderr.

Each check runs a new Python process on its own kernel cache (numba compiles once per cache), with the narrow
1-16-1 network: one configuration compiles its fused kernel in a few seconds. The processes, on one cache:

1. empty cache, FASTBP_QUIET_COMPILE=1: compiles (sigmoid), prints nothing;
2. the same cache: sigmoid is warm; tanh compiles (the line, naming it), then float64 compiles (no second line);
3. the same cache again: everything is warm, nothing compiles, nothing is printed.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastbp
from fastbp import _compile_notice

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastbp

    X = np.linspace(-1, 1, 50).reshape(-1, 1); y = 2 * X
    seconds = {}
    for activation, dtype in [tuple(spec.split(":")) for spec in sys.argv[1:]]:
        before = fastbp.compile_seconds()
        model = fastbp.MLP([1, 16, 1], activation, dtype=np.dtype(dtype), seed=0)
        fastbp.Trainer(model, loss="mse", lr=0.01, batch_size=None).fit(X, y, epochs=2)
        seconds[f"{activation}:{dtype}"] = fastbp.compile_seconds() - before
    print(json.dumps(seconds))
""")


def run(cache, *fits, quiet=False):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBP_QUIET_COMPILE", "FASTBP_CACHE")}
    env["NUMBA_CACHE_DIR"] = str(cache)
    if quiet:
        env["FASTBP_QUIET_COMPILE"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, *fits], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    notices = [line for line in done.stderr.splitlines() if line.startswith("fastbp: compiling")]
    return notices, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_line_appears_once_while_compiling_and_never_on_a_warm_cache(tmp_path):
    cache = tmp_path / "cache"
    notices, seconds = run(cache, "sigmoid:float32", quiet=True)
    assert notices == [] and seconds["sigmoid:float32"] > _compile_notice.THRESHOLD_SECONDS  # compiled, silently

    notices, seconds = run(cache, "sigmoid:float32", "tanh:float32", "sigmoid:float64")
    assert seconds["sigmoid:float32"] == 0.0  # loaded from the cache: no compile event at all
    assert seconds["tanh:float32"] > _compile_notice.THRESHOLD_SECONDS
    assert seconds["sigmoid:float64"] > _compile_notice.THRESHOLD_SECONDS  # compiled too, and said nothing more
    assert len(notices) == 1, notices
    line = notices[0]
    assert "Trainer.fit with a 1-16-1 tanh network (float32, mse, sgd)" in line
    assert "once per machine" in line and "python -m fastbp precompile" in line and "FASTBP_QUIET_COMPILE=1" in line

    notices, seconds = run(cache, "sigmoid:float32", "tanh:float32", "sigmoid:float64")
    assert notices == [] and set(seconds.values()) == {0.0}


def test_quick_compilations_and_other_code_say_nothing(monkeypatch, capsys):
    """Below the threshold nothing is printed, and compilations outside fastbp's calls are not counted."""
    from numba import njit

    monkeypatch.delenv("FASTBP_QUIET_COMPILE", raising=False)
    before = fastbp.compile_seconds()

    @njit(cache=False)
    def user_function(x):  # the user's own numba code, compiled inside a fastbp call: not fastbp's
        return x + 1

    with _compile_notice.watching(lambda: "a test"):
        user_function(1)
    assert fastbp.compile_seconds() == before
    assert "fastbp: compiling" not in capsys.readouterr().err


def test_message_names_the_cache_and_the_cuda_case():
    cpu = _compile_notice.message("Trainer.fit with a 2-3-1 relu network (float32, mse, sgd)")
    assert cpu.startswith("fastbp: compiling CPU kernels for Trainer.fit with a 2-3-1 relu network") and "\n" not in cpu
    cuda = _compile_notice.message("Trainer.fit with x", target="cuda")
    assert "numba-cuda keeps no disk cache" in cuda and "once per machine" not in cuda
