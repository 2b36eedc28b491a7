# Sourced by .ci/run ($root, $py): the parameter sweep of examples/sweep.py on a Dask LocalCluster (2 worker
# processes) gives exactly the cross-validation scores of joblib's loky processes (every split's accuracy and
# log-loss, compared as floats, not rounded). Installs the dask extra (dask[distributed] and scikit-learn).
# The workers load the kernels from NUMBA_CACHE_DIR, which the main test run has filled; precompile (one
# process, before any worker starts) makes sure of it without two workers compiling into one cache at once
# (numba #10128), as docs/scale-out.md tells users to warm theirs.
"$root/.venv/bin/pip" install -q -e "$root[dask]"
"$py" -m fastbp precompile --dtype float64 --activations relu --losses softmax_cross_entropy --optimizers adam -q
sweep_out=$(mktemp -d)
for backend in loky dask; do
  (cd "$root" && "$py" -W ignore examples/sweep.py --backend "$backend" --max-iter 5 \
    --json "$sweep_out/$backend.json" >"$sweep_out/$backend.log" 2>&1) \
    || { cat "$sweep_out/$backend.log" >&2; echo "CI: the $backend sweep failed" >&2; exit 1; }
  grep "settings x" "$sweep_out/$backend.log"
done
"$py" - "$sweep_out/loky.json" "$sweep_out/dask.json" <<'PY'
import json, sys
loky, dask = (json.load(open(path)) for path in sys.argv[1:])
assert loky["params"] == dask["params"] and len(loky["split_scores"]) == 4, (loky, dask)
if loky["split_scores"] != dask["split_scores"]:
    sys.exit(f"CI: the Dask sweep differs from loky's:\n loky {loky['split_scores']}\n dask {dask['split_scores']}")
print(f"dask sweep == loky sweep: {sum(map(len, loky['split_scores']))} split scores, bit for bit")
PY
rm -rf "$sweep_out"
