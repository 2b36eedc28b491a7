"""Tests of fastbp.distributed that need several MPI ranks.

Run them with ``mpiexec -n 2 python -m mpi4py -m pytest tests/mpi`` (see .ci/steps/mpi.sh). In a plain,
single-process ``pytest`` run they are skipped: MPI is not even initialised.
"""
import os

import pytest

# Set by the launchers: MPICH/Intel MPI (Hydra: PMI_RANK), Open MPI, Slurm's srun with PMI.
_LAUNCHER_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")


def _mpi_world_size() -> int:
    if not any(var in os.environ for var in _LAUNCHER_VARS):
        return 0
    try:
        from mpi4py import MPI
    except ImportError:
        return 0
    return MPI.COMM_WORLD.Get_size()


WORLD_SIZE = _mpi_world_size()


def pytest_collection_modifyitems(config, items):
    if WORLD_SIZE >= 2:
        return
    skip = pytest.mark.skip(reason="needs >= 2 MPI ranks: mpiexec -n 2 python -m mpi4py -m pytest tests/mpi")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD
