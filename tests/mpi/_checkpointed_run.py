"""Run under mpiexec -n 2: the resume test's run, checkpointing every epoch to PATH, until rank 1 is killed
(SIGKILL, as a crashed node) a moment after epoch KILL_AFTER ends, somewhere inside a later epoch.

    python _checkpointed_run.py PATH KILL_AFTER
"""
import os
import signal
import sys
import threading

from mpi4py import MPI

from fastbp.distributed import DataParallelTrainer, shard
from tests.mpi._jobs import RESUME_SETTINGS, resume_model, resume_problem

path, kill_after = sys.argv[1], int(sys.argv[2])
comm = MPI.COMM_WORLD
X, y = resume_problem()


def kill_rank_1_later(trainer, history):
    if comm.rank == 1 and trainer.epochs_done == kill_after:
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGKILL)).start()


trainer = DataParallelTrainer(resume_model(), comm=comm, **RESUME_SETTINGS)
trainer.fit(*shard(X, y, comm), epochs=10**6, checkpoint_every=1, checkpoint_path=path,
            callbacks=[kill_rank_1_later])
print("unreachable: training finished", flush=True)
