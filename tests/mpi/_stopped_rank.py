"""Run under mpiexec -n N (N >= 2): rank 1 is stopped (SIGSTOP) a moment into training, at whatever point it has
reached, as a frozen node or a process hung in I/O would be. The other ranks must notice within
collective_timeout (plus the notice grace) and report, naming rank 1.

    python _stopped_rank.py TIMEOUT abort   # the default on_error: each live rank reports, the job is aborted
    python _stopped_rank.py TIMEOUT raise   # on_error="raise": each live rank catches the error and prints it
"""
import os
import signal
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

import fastbp
from fastbp.distributed import CollectiveTimeoutError, DataParallelTrainer, shard

timeout, on_error = float(sys.argv[1]), sys.argv[2]
comm = MPI.COMM_WORLD
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 5)).astype(np.float32)
y = rng.integers(0, 3, 64)
trainer = DataParallelTrainer(fastbp.MLP([5, 8, 3], seed=0), comm=comm, loss="softmax_cross_entropy", lr=0.1,
                              batch_size=8, seed=0, on_error=on_error, collective_timeout=timeout)
trainer.fit(*shard(X, y, comm), epochs=2)  # compiled and in step before the stop


def stop():
    print(f"STOPPED rank {comm.rank} at {time.time():.3f}", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


if comm.rank == 1:
    threading.Timer(0.3, stop).start()
try:
    trainer.fit(*shard(X, y, comm), epochs=10**6)
    print("unreachable: training finished", flush=True)
except CollectiveTimeoutError as error:
    print(f"CAUGHT rank {comm.rank} at {time.time():.3f} missing={list(error.missing_ranks)}: {error}", flush=True)
    time.sleep(1.0)  # the other live rank prints too
    comm.Abort(3)
