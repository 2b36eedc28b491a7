"""Smoke test of `python -m fastbp bench` (tiny sizes) and of the numpy reference it compares with."""
import json

import numpy as np

from fastbp import bench


def test_bench_command_runs_tiny(capsys):
    rc = bench.main(["--workloads", "W1,W2", "--samples", "64", "--repeats", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    devices = {row["device"] for row in report["rows"]}
    assert {"cpu", "numpy"} <= devices
    assert "cuda" in devices or "cuda" in report["skipped"]  # CUDA either ran or says why not
    for row in report["rows"]:
        assert row["seconds"] > 0 and row["samples_per_s"] > 0
        assert row["vs_numpy"] > 0


def test_bench_table_and_batch_sweep(capsys):
    assert bench.main(["--workloads", "W3", "--samples", "96", "--batch-sizes", "16,32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "W3" in out and "vs numpy" in out and out.count("W3") >= 4  # 2 batch sizes x (cpu, numpy)


def test_numpy_reference_learns():
    X, y = bench.make_data("W2", 256)
    weights, biases = bench.linear_init(bench.WORKLOADS["W2"]["sizes"])
    net = bench.NumpyMLP([64, 128, 10], "relu", "softmax_cross_entropy", weights, biases)
    Y = bench.one_hot(y, 10)

    def loss():
        h = np.maximum(X @ net.weights[0] + net.biases[0], 0)
        z = h @ net.weights[1] + net.biases[1]
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - (z * Y).sum(1)))

    before = loss()
    net.train(X, Y, 32, 0.1, 10, np.random.default_rng(0))
    assert loss() < 0.7 * before  # 2.30 -> 1.20 with this seed


def test_help_is_plain_text_and_says_how_threads_behave_on_a_busy_machine(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    raw = capsys.readouterr().out
    text = " ".join(raw.split())  # argparse wraps the option help
    assert "SWEEP" not in text and "``" not in text  # no internal names, no reStructuredText
    assert "16, 32, 64, 128, 256, 512, 1024, 4096" in text and "OMP_WAIT_POLICY=PASSIVE" in text
    for name, spec in bench.WORKLOADS.items():
        assert f"{name}  {'-'.join(map(str, spec['sizes']))} {spec['activation']}" in raw


def test_a_loaded_machine_gets_a_note(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    from fastbp import _threads

    monkeypatch.setattr(_threads, "threading_layer", lambda: "omp")  # spinning threads: the advice applies
    note = bench._loaded_machine()
    assert note.startswith("note: load average 5.0 on 2 logical CPUs") and "OMP_WAIT_POLICY=PASSIVE" in note
    monkeypatch.setattr(_threads, "threading_layer", lambda: "tbb")  # sleeping threads: only the load is noted
    note = bench._loaded_machine()
    assert note.startswith("note: load average 5.0") and "OMP_WAIT_POLICY" not in note
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert bench._loaded_machine() is None
