"""Data-parallel training over MPI: workload W3 (784-256-256-10 relu, softmax cross-entropy, SGD batch 128).

Every rank builds the same seeded data (60000 x 784 N(0,1), labels from a random linear teacher), keeps
its contiguous shard, and trains with fastbp.distributed.DataParallelTrainer: each global batch of 128 is
split across the ranks by where its rows live, and one in-place Allreduce of the flat gradient (269,322
numbers, 1.08 MB in float32) per step averages it. Rank 0 prints the global loss per epoch, then the time
per step split into compute and the Allreduce, and a microbenchmark of the Allreduce alone.

    mpiexec -n 2 env NUMBA_NUM_THREADS=1 python -m mpi4py examples/data_parallel.py   # 2 ranks on 2 cores
    python examples/data_parallel.py --reference          # fastbp.Trainer in one process, for comparison
    python examples/data_parallel.py --samples 2000 --epochs 1                      # smoke test, one rank

    # checkpoint every epoch; after a crash, resume (on any number of ranks) to the same weights
    mpiexec -n 2 python -m mpi4py examples/data_parallel.py --epochs 3 --checkpoint run.npz
    mpiexec -n 2 python -m mpi4py examples/data_parallel.py --epochs 3 --checkpoint run.npz --resume

An epoch of the 60,000 rows takes 1.6-2.6 s on 2 ranks of a busy 2-core AMD EPYC (docs/scale-out.md has the
measurements); the first run in a fresh numba cache compiles the kernels first (about a minute per rank).
docs/scale-out.md also runs this program on a hostfile and under SLURM. On a machine with few cores give each
rank its share of threads (NUMBA_NUM_THREADS). With --device cuda each rank uses one GPU (rank r takes GPU
r % count through CUDA_VISIBLE_DEVICES set by the launcher or by you) and the gradient goes through a host
buffer.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def w3_data(n: int, n_in: int = 784, k: int = 10, seed: int = 0, dtype=np.float32):
    """The W3 problem: X ~ N(0,1), y = argmax of a random linear teacher's scores (float32 draws, then dtype)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in), dtype=np.float32)
    teacher = rng.standard_normal((n_in, k), dtype=np.float32)
    return X.astype(dtype, copy=False), np.argmax(X @ teacher, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs in all (a resumed run trains the rest)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--reference", action="store_true",
                        help="train with fastbp.Trainer in this one process instead (no MPI)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="save a checkpoint after every epoch (rank 0 writes it; --reference: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    parser.add_argument("--allreduce-repeats", type=int, default=200)
    parser.add_argument("--collective-timeout", type=float, default=600.0,
                        help="seconds a rank waits for the others in one collective before the job is aborted "
                             "(0: wait forever, MPI's blocking behaviour)")
    args = parser.parse_args()
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH")

    import fastbp

    X, y = w3_data(args.samples, dtype=np.dtype(args.dtype))
    sizes = [784, 256, 256, 10]
    settings = dict(loss="softmax_cross_entropy", optimizer="sgd", lr=args.lr, batch_size=args.batch_size,
                    device=args.device, seed=0)
    model = lambda: fastbp.MLP(sizes, "relu", dtype=args.dtype, seed=0)  # noqa: E731
    if args.reference:
        trainer = fastbp.Trainer(model(), **settings)
        trainer.fit(X[:args.batch_size * 4], y[:args.batch_size * 4], epochs=1)  # compile outside the timing
        trainer = fastbp.Trainer.load(args.checkpoint) if args.resume else fastbp.Trainer(model(), **settings)
        history = trainer.fit(X, y, epochs=max(0, args.epochs - trainer.epochs_done))
        for epoch, loss, seconds in zip(history.epoch, history.loss, history.time):
            print(f"epoch {epoch}: loss {loss:.5f} ({seconds:.3f} s, one process, fastbp.Trainer)")
        if history.time:
            steps = -(-len(X) // args.batch_size)
            print(f"median epoch {np.median(history.time):.3f} s = {1e3 * np.median(history.time) / steps:.3f} ms "
                  f"per step")
        if args.checkpoint:
            trainer.save(args.checkpoint)
        return

    from mpi4py import MPI

    from fastbp.distributed import DataParallelTrainer, shard

    comm = MPI.COMM_WORLD
    X_local, y_local = (a.copy() for a in shard(X, y, comm))
    del X, y
    settings["collective_timeout"] = args.collective_timeout or None
    # Compile on a few rows first, so the timings below are training only.
    warm = DataParallelTrainer(model(), comm=comm, **settings)
    warm.fit(X_local[:256], y_local[:256], epochs=1)
    if args.resume:
        trainer = DataParallelTrainer.load(args.checkpoint, comm=comm,
                                           collective_timeout=settings["collective_timeout"])
        if comm.rank == 0:
            print(f"resuming {args.checkpoint} after epoch {trainer.epochs_done} on {comm.size} ranks", flush=True)
    else:
        trainer = DataParallelTrainer(model(), comm=comm, **settings)
    remaining = max(0, args.epochs - trainer.epochs_done)
    checkpointing = dict(checkpoint_every=1, checkpoint_path=args.checkpoint) if args.checkpoint else {}
    history = trainer.fit(X_local, y_local, epochs=remaining, verbose=True, **checkpointing)
    if not remaining:
        return

    # This rank's time per step, and the slowest rank's (what the job waits for).
    t = trainer.timings
    epoch_s, comm_s, steps = (np.median(t["epoch_seconds"]), np.median(t["allreduce_seconds"]),
                              t["steps"][0])
    step_ms = comm.allreduce(1e3 * epoch_s / steps, op=MPI.MAX)
    comm_ms = comm.allreduce(1e3 * comm_s / steps, op=MPI.MAX)

    # The Allreduce alone, ranks in step (no waiting for a slower rank's compute).
    buffer = np.ones(trainer.model.n_params, dtype=trainer.model.dtype)
    comm.Barrier()
    started = time.perf_counter()
    for _ in range(args.allreduce_repeats):
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    alone_ms = comm.allreduce(1e3 * (time.perf_counter() - started) / args.allreduce_repeats, op=MPI.MAX)
    if comm.rank == 0:
        print(f"{comm.size} ranks, {steps} steps per epoch, P = {trainer.model.n_params} "
              f"({buffer.nbytes / 1e6:.2f} MB of {args.dtype} gradient per step), "
              f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'all cores')}")
        print(f"median epoch {epoch_s:.3f} s = {step_ms:.3f} ms per step, of which {comm_ms:.3f} ms in the "
              f"Allreduce (including waiting for the slowest rank)")
        print(f"Allreduce alone: {alone_ms:.3f} ms per step; final loss {history.loss[-1]:.5f}")
    scores = trainer.evaluate(X_local, y_local)
    if comm.rank == 0:
        print(f"training accuracy over all ranks' data: {scores['accuracy']:.4f}")


if __name__ == "__main__":
    main()
