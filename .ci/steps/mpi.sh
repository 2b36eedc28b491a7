# Sourced by .ci/run (uses $root, $py, run_pytest). Data-parallel training over MPI on this machine:
# installs the mpi extra (mpi4py + the mpich wheel: pip alone gives a working mpiexec), then runs the
# tests under tests/mpi on 2 ranks. `python -m mpi4py` aborts every rank on an uncaught error instead of
# leaving the others waiting in a collective.
"$root/.venv/bin/pip" install -q -e '.[mpi]'
mpiexec="$root/.venv/bin/mpiexec"
# Both ranks load their kernels from the cache the README's test command filled (fastbp's cache names each
# entry's machine code after its key, so two processes compiling into one cache cannot mix up entries: numba
# #10128, fixed in fastbp._jit; a cold cache per rank cost this step about 90 s of compiling).
# 1 numba thread per rank: 2 ranks on 2 cores, no oversubscription.
run_pytest timeout 900 "$mpiexec" -n 2 env NUMBA_NUM_THREADS=1 \
  "$py" -m mpi4py -m pytest tests/mpi -q -p no:cacheprovider
"$py" examples/data_parallel.py --help >/dev/null
# The example trains 1 epoch with a checkpoint, then resumes it for a second (the docs' recipe), and the SLURM
# batch script of docs/scale-out.md at least parses (CI has no SLURM; it ran on a one-node SLURM 22.05).
mpi_run=$(mktemp -d)
for resume in "" --resume; do
  run_pytest timeout 300 "$mpiexec" -n 2 env NUMBA_NUM_THREADS=1 \
    "$py" -m mpi4py examples/data_parallel.py --samples 2000 --epochs "$([ -n "$resume" ] && echo 2 || echo 1)" \
    --checkpoint "$mpi_run/run.npz" $resume
done
"$py" -c "import fastbp, sys; sys.exit(fastbp.Trainer.load(sys.argv[1]).epochs_done != 2)" "$mpi_run/run.npz"
rm -rf "$mpi_run"
bash -n examples/data_parallel.sbatch
