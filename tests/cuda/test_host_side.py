"""The CUDA backend as the distributed host side uses it: training on GPU arrays for X and y (one rank,
through a stand-in communicator: the data path is the same for any number of ranks)."""
import numpy as np
import pytest

import fastbp

from .conftest import SKIP_REASON, cuda_reason

pytestmark = pytest.mark.skipif(cuda_reason() is not None, reason=SKIP_REASON)


class _Done:
    """A nonblocking operation of a one-rank job: complete as soon as it starts."""

    def Test(self):
        return True


class _OneRank:
    """The parts of an mpi4py communicator DataParallelTrainer uses, for a job of one rank."""

    def Iallreduce(self, sendbuf, recvbuf, op=None):
        return _Done()

    def Ibcast(self, buffer, root=0):
        return _Done()

    def Ibarrier(self):
        return _Done()

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def allgather(self, value):
        return [value]

    def bcast(self, value, root=0):
        return value

    def Bcast(self, buffer, root=0):
        pass

    def Allreduce(self, sendbuf, recvbuf, op=None):
        pass

    def Abort(self, code):  # pragma: no cover - only on failure
        raise SystemExit(code)


@pytest.fixture
def one_rank(monkeypatch):
    from fastbp import distributed

    class _MPI:
        IN_PLACE = object()
        SUM = object()

    monkeypatch.setattr(distributed, "_mpi", lambda: _MPI)
    return _OneRank()


def test_distributed_takes_gpu_arrays_for_both_x_and_y(small_launches, one_rank, rng):
    """With device="cuda", X and y may both be GPU arrays (each epoch's shard is gathered on the device); the
    result equals training on host arrays."""
    from fastbp.distributed import DataParallelTrainer
    from fastbp.kernels import cuda as kernels

    X = rng.normal(size=(19, 4)).astype(np.float32)
    Y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 19)]
    kw = dict(loss="softmax_cross_entropy", lr=0.1, batch_size=6, seed=2, device="cuda")
    on_gpu = DataParallelTrainer(fastbp.MLP([4, 5, 3], seed=1), comm=one_rank, **kw)
    on_host = DataParallelTrainer(fastbp.MLP([4, 5, 3], seed=1), comm=one_rank, **kw)
    single = fastbp.Trainer(fastbp.MLP([4, 5, 3], seed=1), **kw)
    history = on_gpu.fit(kernels.to_device(X), kernels.to_device(Y), epochs=2)
    on_host.fit(X, Y, epochs=2)
    reference = single.fit(X, Y, epochs=2)
    np.testing.assert_array_equal(on_gpu.model.flat_parameters(), on_host.model.flat_parameters())
    np.testing.assert_allclose(on_gpu.model.flat_parameters(), single.model.flat_parameters(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(history.loss, reference.loss, rtol=1e-5)
