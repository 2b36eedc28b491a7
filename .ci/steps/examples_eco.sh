# Smoke tests of the scikit-learn, progress, plotting and info features and of the kernels' public API: each
# example runs briefly, and the plotting ones must write their PNGs. Sourced by .ci/run with $py and $root set.
"$py" -m pip install -q -e "$root[sklearn,plot]"
eco_out=$(mktemp -d)
(cd "$root" && "$py" -m fastbp info)
(cd "$root" && "$py" examples/plot_seed_regression.py --epochs 200 --out "$eco_out" >/dev/null)
(cd "$root" && "$py" examples/plot_digits.py --max-iter 3 --out "$eco_out" >/dev/null)
(cd "$root" && "$py" examples/plot_crossover.py --samples 256 --epochs 1 --hidden 32 --batch-sizes 32 256 \
  --out "$eco_out" >/dev/null)
(cd "$root" && "$py" examples/embed_in_package.py --points 50 --epochs 20 >/dev/null)
(cd "$root" && "$py" examples/online_learning_njit.py --steps 3000 --trainer-steps 30 >/dev/null)
for png in seed_regression_fit seed_regression_loss digits_loss digits_confusion crossover; do
  [ -s "$eco_out/$png.png" ] || { echo "CI: examples did not write $png.png" >&2; exit 1; }
done
rm -rf "$eco_out"
