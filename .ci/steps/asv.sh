# Sourced by .ci/run ($root = the checkout, its .venv has fastbp installed editable). Runs the asv suite
# once in --quick mode (every benchmark a single time) so the benchmarks cannot rot. asv can exit 0 when a
# benchmark fails, so its output is checked too: a "failed" benchmark or a traceback fails CI.
"$root/.venv/bin/pip" install -q 'asv>=0.6.4'
asv_log=$(mktemp)
asv_rc=0
(
  cd "$root/asv_benchmarks"
  export HOME="${ASV_HOME:-$(mktemp -d)}"  # asv keeps its machine file in $HOME
  "$root/.venv/bin/asv" machine --yes >/dev/null
  "$root/.venv/bin/asv" run --python=same --quick --show-stderr
) >"$asv_log" 2>&1 || asv_rc=$?
grep -E "^\[[ 0-9.]+%\] ··· " "$asv_log" || true
if [ "$asv_rc" -ne 0 ] || grep -qE "[[:space:]]failed$|Traceback|Failed to build|[Nn]o benchmarks" "$asv_log"; then
  echo "CI: the asv suite failed (exit $asv_rc); its log:" >&2
  cat "$asv_log" >&2
  exit 1
fi
if ! grep -qE "TrainWorkload.time_train +ok" "$asv_log"; then
  echo "CI: asv did not run the training benchmarks; its log:" >&2
  cat "$asv_log" >&2
  exit 1
fi
echo "asv: every benchmark ran"
