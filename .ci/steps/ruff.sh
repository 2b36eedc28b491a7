# Lint with ruff (configured in pyproject.toml). Sourced by .ci/run with $py and $root set.
"$py" -m pip install -q "ruff>=0.5"
lint_paths=()
for dir in fastbp tests examples asv_benchmarks; do
  [ -d "$root/$dir" ] && lint_paths+=("$root/$dir")
done
(cd "$root" && "$py" -m ruff check "${lint_paths[@]}")
