"""The compile helper that ``import fastbp`` starts on standby where the kernel cache is cold (fastbp._standby): when
it starts, that the first trainer's helper is that process, and that it stops by itself (expired, let go, or its
parent gone) without leaving its claim folder behind."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

import fastbp._standby
from fastbp import _jit

pytestmark = pytest.mark.skipif(not _jit.CACHE_ENABLED, reason="no disk cache (FASTBP_CACHE=0): no helpers")


def run_python(code, cache_dir, **environment):
    # FASTBP_COMPILE_PROCESSES="": helpers allowed, whatever this process was given (see conftest.py)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **{"FASTBP_COMPILE_PROCESSES": "", **environment})
    env.pop("FASTBP_SIMD_BITS", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def _wait_until(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_cold_cache_probe_looks_where_numba_writes_the_product_engine(tmp_path):
    """The probe's folder and index name are those numba's cache uses for the product engine (numba's locator, not
    a copy of it, says where), and it reads cold before a first predict and warm after it."""
    out = run_python("""
        import numpy as np, fastbp, fastbp._standby as standby
        from fastbp.kernels import gemm
        cache = gemm._product_by_symbol._cache
        print(standby.kernel_cache_folder() == cache._cache_path,
              cache._cache_file._index_name.startswith(standby.PROBE_FUNCTION + "-"), standby.cache_looks_cold())
        model = fastbp.MLP([3, 4, 2], activation="relu", seed=0)
        fastbp.Trainer(model, loss="softmax_cross_entropy").predict(np.ones((2, 3), np.float32))
        print(standby.cache_looks_cold())
    """, tmp_path, FASTBP_COMPILE_PROCESSES="1")
    assert out == ["True True True", "False"], out


def test_a_cold_import_starts_a_standby_that_becomes_the_first_trainers_helper(tmp_path):
    """With a cold cache, ``import fastbp`` starts the standby; the first trainer gives it its list (its process is
    the trainer's helper, not a new one), the predict gives the numbers a process compiling alone gives, and the
    claim folder is gone once the helper has stopped. A process whose cache is warm starts none."""
    code = """
        import os, numpy as np, fastbp, fastbp._standby as standby, fastbp._jit as jit
        from numba import types
        waiting = standby._standby
        print(waiting is not None)
        model = fastbp.MLP([3, 4, 2], activation="relu", seed=0)
        trainer = fastbp.Trainer(model, loss="softmax_cross_entropy")
        helper = jit._helpers.get(types.float32)
        if waiting is not None:
            print(helper is not None and helper.process is waiting[0] and helper.folder == waiting[1],
                  waiting[1], helper.process.pid)
        print(trainer.predict(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)).tolist())
    """
    cold = run_python(code, tmp_path / "shared")
    assert cold[0] == "True", cold
    taken, folder, pid = cold[1].split()
    assert taken == "True", cold
    assert _wait_until(lambda: not os.path.exists(folder)), "the helper left its claim folder"
    alone = run_python(code, tmp_path / "alone", FASTBP_COMPILE_PROCESSES="1")
    assert alone[0] == "False" and alone[1] == cold[2], (alone, cold)  # no standby; bit for bit
    warm = run_python(code, tmp_path / "shared")
    assert warm == ["False", cold[2]], warm


def test_no_standby_where_no_helper_would_be_started(tmp_path):
    """One compile process (FASTBP_COMPILE_PROCESSES=1), no disk cache (FASTBP_CACHE=0), or inside a helper: the
    import starts nothing."""
    code = "import fastbp, fastbp._standby as standby; print(standby._standby is None)"
    for variables in ({"FASTBP_COMPILE_PROCESSES": "1"}, {"FASTBP_CACHE": "0"}, {_jit.WORKER_VARIABLE: "1"}):
        assert run_python(code, tmp_path, **variables) == ["True"], variables


def _standby_process(tmp_path, idle_seconds, parent=None):
    folder = tmp_path / "claims"
    folder.mkdir()
    env = fastbp._standby.helper_environment(NUMBA_CACHE_DIR=str(tmp_path / "cache"), FASTBP_COMPILE_WORKER="1")
    process = subprocess.Popen([sys.executable, "-m", "fastbp._compile_worker", str(folder),
                                str(os.getpid() if parent is None else parent), "--standby", str(idle_seconds)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return process, str(folder)


def test_a_standby_nobody_takes_expires_and_a_late_take_finds_it_gone(tmp_path, monkeypatch):
    """Untaken after its idle time, the standby claims its own folder, stops and removes the folder; the parent's
    take() then answers None (its trainer starts a helper of its own), whichever side claimed first."""
    process, folder = _standby_process(tmp_path, idle_seconds=0.2)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert not os.path.exists(folder)
    monkeypatch.setattr(fastbp._standby, "_standby", [process, folder, os.getpid()])
    assert fastbp._standby.take() is None and fastbp._standby._standby is None
    assert not list((tmp_path / "cache").rglob("*.nbi"))  # it compiled nothing into the cache


def test_a_taken_standby_compiles_its_assignment(tmp_path, monkeypatch):
    """Taken (the parent claims it first), the standby compiles the functions of its assignment into the disk
    cache, marks each done, and stops once nothing is left (its folder is then the parent's to remove)."""
    import shutil

    from numba import types

    from fastbp.kernels import cpu

    process, folder = _standby_process(tmp_path, idle_seconds=600)
    try:
        monkeypatch.setattr(fastbp._standby, "_standby", [process, folder, os.getpid()])
        assert fastbp._standby.take() == (process, folder)
        fastbp._standby.write_assignment(folder, types.float64, ["fastbp.kernels.cpu:optimizer_step"])
        assert _wait_until(lambda: os.path.exists(_jit.done_marker(folder, cpu.optimizer_step, types.float64)))
        assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)
    assert list((tmp_path / "cache").rglob("*_optimizer_step*.nbi"))


def test_a_standby_let_go_or_orphaned_stops_without_compiling(tmp_path, monkeypatch):
    """release() (fastbp.precompile's) stops a waiting standby at once; one whose parent has gone (told its parent
    is pid 1) stops too; each removes its claim folder and compiles nothing."""
    process, folder = _standby_process(tmp_path, idle_seconds=600)
    monkeypatch.setattr(fastbp._standby, "_standby", [process, folder, os.getpid()])
    fastbp._standby.release()
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert not os.path.exists(folder) and fastbp._standby._standby is None
    orphan_path = tmp_path / "orphan"
    orphan_path.mkdir()
    orphan, orphan_folder = _standby_process(orphan_path, idle_seconds=600, parent=1)
    assert orphan.wait(timeout=120) == 0, orphan.stderr.read()
    assert not os.path.exists(orphan_folder)
    assert not list((tmp_path / "cache").rglob("*.nbi")) and not list((orphan_path / "cache").rglob("*.nbi"))


def test_a_forked_child_never_takes_its_parents_standby(monkeypatch, tmp_path):
    """The standby object a forked child inherits is its parent's: take() there answers None."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(fastbp._standby, "_standby", [process, str(tmp_path), os.getpid() + 1])
        assert fastbp._standby.take() is None
        assert not (tmp_path / fastbp._standby.TAKEN).exists()
    finally:
        process.kill()
