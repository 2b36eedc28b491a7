# Sourced by .ci/run: the benchmark programs still run (tiny sizes; peers that are not installed are skipped).
"$py" -m fastbp bench --workloads W1,W2,W3 --samples 256 --repeats 1 >/dev/null
"$py" examples/compare_peers.py --workloads W1,W2 --samples 256 --rounds 1 | tail -6
