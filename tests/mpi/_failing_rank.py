"""Run under mpiexec -n 2 (plain python, no -m mpi4py): rank 1's callback raises during the second epoch.

fastbp.distributed must end the whole job (comm.Abort) instead of leaving rank 0 in the Allreduce."""
import sys

import numpy as np
from mpi4py import MPI

import fastbp
from fastbp.distributed import DataParallelTrainer, shard

comm = MPI.COMM_WORLD
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 5)).astype(np.float32)
y = rng.integers(0, 3, 64)


def callback(trainer, history):
    if comm.rank == 1 and len(history.loss) == 2:
        raise RuntimeError("deliberate failure on rank 1")


trainer = DataParallelTrainer(fastbp.MLP([5, 8, 3], seed=0), comm=comm, loss="softmax_cross_entropy", lr=0.1,
                              batch_size=8, seed=0)
trainer.fit(*shard(X, y, comm), epochs=1000, callbacks=[callback])
print("unreachable: training finished", flush=True)
sys.exit(0)
