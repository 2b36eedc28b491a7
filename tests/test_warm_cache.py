"""fastbp.precompile / python -m fastbp precompile: after it, the calls it covers compile nothing in a new
process (they load from the disk cache), and bad arguments are refused before anything is compiled."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastbp


def run_python(code, cache_dir, **env):
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                          text=True, timeout=900)


# A user's script after precompile(float32, relu, softmax cross-entropy, adam): other layer widths, batch
# sizes and row counts than precompile's, every public CPU call; prints how many fastbp functions compiled.
USERS_SCRIPT = """
    import json
    import numpy as np
    import fastbp
    from fastbp.warm_cache import _counting_compilations

    rng = np.random.default_rng(1)
    with _counting_compilations() as compiled:
        for sizes in ([20, 64, 48, 5], [2, 16, 3]):  # the product engine; the fused narrow kernel
            X = rng.standard_normal((200, sizes[0])).astype(np.float32)
            y = rng.integers(0, sizes[-1], 200)
            w = rng.random(200)
            model = fastbp.MLP(sizes, activation="relu", seed=3)
            trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer="adam", lr=0.01, batch_size=16)
            trainer.fit(X, y, epochs=3, validation_data=(X[:50], y[:50]))
            trainer.fit(X, y, epochs=1, sample_weight=w)
            trainer.predict(X[:1]), trainer.predict(X), trainer.evaluate(X, y), trainer.evaluate(X, y, sample_weight=w)
            trainer.loss_and_grads(X, y), trainer.loss_and_grads(X, y, sample_weight=w)
            fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer="adam", batch_size=None,
                           clip_grad_norm=0.5).fit(X, y, epochs=2)
    print(json.dumps({"compiled": compiled[0]}))
"""


def test_calls_it_covers_compile_nothing_in_a_new_process(tmp_path):
    # Two processes: this one the product engine with the relu fused kernel, a helper the tanh fused kernel.
    filled = run_python("""
        import json, fastbp
        print(json.dumps(fastbp.precompile("float32", ["relu", "tanh"], "softmax_cross_entropy", "adam",
                                           processes=2)))
    """, tmp_path)
    assert filled.returncode == 0, filled.stderr[-3000:]
    summary = json.loads(filled.stdout.strip().splitlines()[-1])
    assert summary["compiled"] > 0 and summary["configurations"] == 3
    assert summary["cache_directory"].startswith(str(tmp_path))

    for activation in ("relu", "tanh"):  # tanh's fused kernel: compiled by the helper
        used = run_python(USERS_SCRIPT.replace('activation="relu"', f'activation="{activation}"'), tmp_path)
        assert used.returncode == 0, used.stderr[-3000:]
        assert json.loads(used.stdout.strip().splitlines()[-1]) == {"compiled": 0}, activation

    # The counter does count: a loss precompile did not cover compiles the fused narrow kernel for it.
    other = run_python(USERS_SCRIPT.replace('"softmax_cross_entropy"', '"mse"').replace(
        "y = rng.integers(0, sizes[-1], 200)", "y = rng.standard_normal((200, sizes[-1])).astype(np.float32)"),
        tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert json.loads(other.stdout.strip().splitlines()[-1])["compiled"] >= 1

    # Again: everything is cached now, so a second precompile compiles nothing.
    again = run_python("""
        import json, fastbp
        print(json.dumps(fastbp.precompile("float32", ["relu", "tanh"], "softmax_cross_entropy", "adam")))
    """, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["compiled"] == 0


def test_shares_compile_nothing_twice_and_balance_the_work():
    from fastbp import warm_cache

    jobs = warm_cache._jobs(("float32", "float64"), ("relu", "sigmoid", "tanh"), ("mse", "poisson"),
                            ("sgd", "adam"))
    assert len(jobs) == 2 * (1 + 12)  # per dtype: the wide network once, the narrow one per combination
    shares = warm_cache._shares(jobs, 2)
    assert sorted(job for share in shares for job in share) == sorted(jobs)  # every job once
    for dtype in ("float32", "float64"):  # a dtype's general path in one process
        assert sum(any(job[5] and job[0] == dtype for job in share) for share in shares) == 1
        for activation in ("relu", "sigmoid", "tanh"):  # a fused kernel (both optimizers) in one process
            for loss in ("mse", "poisson"):
                assert sum(any(job[:1] + job[2:4] == (dtype, activation, loss) for job in share)
                           for share in shares) == 1
    # per dtype: the general path (cost 5, with relu-mse's kernel) and 5 more kernels (cost 1 each): 10 each
    kernels = [{job[:1] + job[2:4] for job in share} for share in shares]
    assert sorted(len(k) for k in kernels) == [6, 6]
    assert warm_cache._shares(jobs, 1) == [jobs] and len(warm_cache._shares(jobs, 64)) == 12
    # relu, leaky_relu and identity networks train with one fused kernel (narrow.kernel_key): one share
    jobs = warm_cache._jobs(("float32",), ("relu", "leaky_relu", "identity"), ("mse",), ("sgd",))
    assert len(jobs) == 4 and warm_cache._shares(jobs, 8) == [jobs]


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtypes="float16"), "dtypes must name float32 and/or float64"),
    (dict(dtypes=()), "dtypes must name float32 and/or float64"),
    (dict(dtypes="not a dtype"), "dtypes must name float32 and/or float64"),
    (dict(activations="softplus"), "activations must be names from"),
    (dict(processes=0), "processes must be a positive integer or None; got 0"),
    (dict(processes=True), "processes must be a positive integer or None; got True"),
    (dict(losses=["mse", "hinge"]), "losses must be names from"),
    (dict(optimizers=()), "optimizers must be names from"),
])
def test_bad_arguments_are_refused_before_compiling(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastbp.precompile(**kwargs)


def test_verbose_must_be_a_bool():
    with pytest.raises(TypeError, match="verbose must be a bool"):
        fastbp.precompile(verbose="yes")


def test_refuses_when_nothing_can_be_cached(tmp_path):
    result = run_python("""
        import fastbp
        try:
            fastbp.precompile()
        except RuntimeError as error:
            print("refused:", error)
    """, tmp_path, FASTBP_CACHE="0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: fastbp.precompile: compiled kernels cannot be cached" in result.stdout


def test_command_line(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "fastbp", "--help"], capture_output=True, text=True)
    assert "precompile" in help_text.stdout
    bad = subprocess.run([sys.executable, "-m", "fastbp", "precompile", "--losses", "hinge"], capture_output=True,
                         text=True, env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert bad.returncode == 1 and "losses must be names from" in bad.stderr
    no_cache = subprocess.run([sys.executable, "-m", "fastbp", "precompile"], capture_output=True, text=True,
                              env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), FASTBP_CACHE="0"))
    assert no_cache.returncode == 1 and "cannot be cached" in no_cache.stderr
