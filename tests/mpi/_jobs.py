"""Helpers for tests that launch a separate MPI job (to watch it fail, hang or die) from inside the test job,
and the problems those jobs train on (imported by the job scripts too: the same data on both sides)."""
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import fastbp

HERE = Path(__file__).parent
# The resume test's run: Adam with a decaying rate, shuffled batches, float64 (so that the comparison with a
# different number of ranks has a tight tolerance).
RESUME_SIZES = [6, 9, 3]
RESUME_SETTINGS = dict(loss="softmax_cross_entropy", optimizer="adam", lr=fastbp.ExponentialDecay(0.02, gamma=0.97),
                       batch_size=16, seed=3)


def resume_problem(n=301):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(n, RESUME_SIZES[0]))
    return X, (X[:, 0] - X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)


def resume_model():
    return fastbp.MLP(RESUME_SIZES, "tanh", dtype=np.float64, seed=4)


def _clean_env():
    """The environment without the launcher's variables, so a child mpiexec starts its own job."""
    prefixes = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPIR_", "OMPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(fastbp.__file__).parents[1]), env.get("PYTHONPATH")]
                                        if p)
    return env


def _mpich_segments() -> set:
    return set(glob.glob("/dev/shm/mpich_shm_*"))


def _remove_orphaned_segments(candidates) -> None:
    """MPICH's shared-memory segments that a killed or aborted job left in /dev/shm (2-3 MB each, in RAM),
    among ``candidates``: those no live process maps."""
    maps = ""
    for path in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(path) as file:
                maps += file.read()
        except OSError:  # the process ended, or is not ours
            pass
    for segment in candidates:
        if segment not in maps:
            with contextlib.suppress(OSError):
                os.unlink(segment)


def run_child_job(comm, script: str, n_ranks: int, args=(), limit: float = 240.0):
    """Rank 0 runs ``mpiexec -n n_ranks python tests/mpi/<script> args`` as a job of its own while the other
    ranks wait without spinning a core (the child job needs them), then removes the shared-memory segments the
    job left behind. Collective; returns on every rank
    ``(returncode or None if it was still running after limit seconds, seconds, output, ended_at)`` where
    ended_at is the wall-clock time (time.time()) at which the job ended."""
    outcome = None
    if comm.Get_rank() == 0:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep
                               + os.environ.get("PATH", ""))
        segments_before = _mpich_segments()
        started = time.perf_counter()
        try:
            run = subprocess.run([mpiexec, "-n", str(n_ranks), sys.executable, str(HERE / script),
                                  *map(str, args)], env=_clean_env(), capture_output=True, text=True, timeout=limit)
            outcome = (run.returncode, time.perf_counter() - started, run.stdout + run.stderr, time.time())
        except subprocess.TimeoutExpired as error:
            outcome = (None, time.perf_counter() - started, str(error.stdout) + str(error.stderr), time.time())
        # The child jobs these tests run are killed or aborted on purpose: clean up after them.
        _remove_orphaned_segments(_mpich_segments() - segments_before)
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.05)
    return comm.bcast(outcome, root=0)
