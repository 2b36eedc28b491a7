"""The GPU session tool (dev.gpu_session, run by .ci/gpu.sh) and examples/compare_peers.py's GPU
peers: the parts that need no GPU. The driver keeps going when a part hangs, fails or cannot run; its reports
are written whatever happens; the measuring helpers run one unit through the backend interface (simulator)
and PyTorch (CPU). On a GPU the session's parts themselves run in .ci/gpu.sh."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dev import gpu_session

from .conftest import SIMULATOR, cuda_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_session_writes_its_reports_and_says_why_parts_are_skipped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    gpu = subprocess.run([sys.executable, "-c", "from fastbp.kernels import cuda; print(cuda.unavailable_reason())"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120).stdout.strip()
    parts = "versions,launch" if gpu == "None" else "versions,launch,workloads,products,tests"
    subprocess.run([sys.executable, "-m", "dev.gpu_session", "--out", str(tmp_path), "--budget", "150",
                    "--parts", parts], env=env, cwd=ROOT, timeout=200, check=True, capture_output=True)
    session = json.loads((tmp_path / "session.json").read_text())
    statuses = {part["part"]: part for part in session["parts"]}
    assert list(statuses) == parts.split(",")
    assert statuses["versions"]["status"] == "ok"
    assert {row["item"] for row in statuses["versions"]["rows"]} >= {"numpy", "numba-cuda", "gpu", "cuda_usable"}
    if gpu != "None":  # no GPU here: every other part is skipped, with the reason
        for name in parts.split(",")[1:]:
            assert statuses[name]["status"] == "skipped" and "GPU" in statuses[name]["reason"]
    markdown = (tmp_path / "session.md").read_text()
    assert "## versions: ok" in markdown and "| item | value |" in markdown


def test_a_part_that_hangs_is_killed_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_session.TIMEOUTS, "hang", 2)
    monkeypatch.setattr(gpu_session, "MIN_PART_SECONDS", 1)

    def command(name, out, quick, timeout):
        if name == "hang":
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return gpu_session._part_command(name, out, quick, timeout)

    results = gpu_session.run_parts(["hang", "versions"], str(tmp_path), budget=100, quick=True, command=command)
    assert [r["status"] for r in results] == ["timed out", "ok"]
    assert results[0]["seconds"] < 30
    # No budget left: the part is skipped, not started.
    assert gpu_session.run_parts(["versions"], str(tmp_path), budget=0.5, quick=True)[0]["status"] == "skipped"


def test_markdown_tables_every_column_of_a_part():
    text = gpu_session.markdown([
        dict(part="workloads", status="ok", seconds=3.0, rows=[dict(workload="W1", fastbp_cuda_s=0.00123),
                                                               dict(workload="W2", torch_cuda_s="skipped: no torch")]),
        dict(part="tests", status="timed out", reason="killed after 300 s", rows=[])])
    assert "| workload | fastbp_cuda_s | torch_cuda_s |" in text
    assert "| W1 | 0.00123 | - |" in text and "| W2 | - | skipped: no torch |" in text
    assert "## tests: timed out" in text and "killed after 300 s" in text


@pytest.mark.skipif(cuda_reason() is not None, reason="needs a GPU or the simulator")
def test_fastbp_unit_runs_through_the_backend_interface(small_launches):
    from .test_backend_cuda import Net

    net = Net([4, 6, 3], "relu", "softmax_cross_entropy", "sgd", np.float32, 9)
    backend = net.backend(False)
    X, Y = backend.as_input(net.X), backend.as_input(net.Y)
    run = gpu_session._fastbp_unit(backend, X, Y, dict(batch_size=4, epochs=1, lr=0.1))
    run()
    run()
    trained = np.empty_like(net.params)
    backend.publish_parameters(trained)
    assert np.isfinite(trained).all() and not np.array_equal(trained, net.params)


def _compare_peers():
    spec = importlib.util.spec_from_file_location("compare_peers", os.path.join(ROOT, "examples", "compare_peers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_units_train_from_the_same_weights():
    torch = pytest.importorskip("torch")
    from fastbp.bench import linear_init, make_data

    X, y = make_data("W1")
    weights, biases = linear_init([1, 16, 1])
    nets = []
    for run in (gpu_session._torch_unit(torch, "W1", X, y, device="cpu"),
                _compare_peers().torch_runner("W1", X, y, weights, biases, device="cpu")):
        first = [p.detach().clone() for p in run.net.parameters()]
        np.testing.assert_array_equal(first[0].numpy(), weights[0].T)  # fastbp's initial weights
        run()
        nets.append([p.detach().numpy() for p in run.net.parameters()])
    for a, b in zip(*nets):  # the same loop, the same 1000 full-batch steps
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_compare_peers_skips_gpu_peers_with_the_reason(capsys):
    pytest.importorskip("torch")
    compare_peers = _compare_peers()
    import torch

    impls = compare_peers.available(["numpy", "pytorch-cuda", "fastbp-cuda"])
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "pytorch-cuda" not in impls and "pytorch-cuda: skipped (torch" in out
    if cuda_reason() is not None or SIMULATOR:
        assert "fastbp-cuda" not in impls and "fastbp-cuda: skipped (" in out
    assert impls[:2] == ["fastbp", "numpy"]


def test_bench_plot_sweeps_batch_sizes_one_curve_per_device(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastbp import bench

    path = tmp_path / "bench.png"
    assert bench.main(["--workloads", "W2", "--samples", "40", "--repeats", "1", "--devices", "cpu", "--json",
                       "--plot", str(path)]) == 0
    rows = json.loads(capsys.readouterr().out.split("\nwrote")[0])["rows"]
    assert sorted({r["batch_size"] for r in rows}) == [16, 32, 40]  # SWEEP up to the data set, then all of it
    assert {r["device"] for r in rows} == {"cpu", "numpy"} and path.stat().st_size > 0


def test_bench_plot_labels_each_workload_in_its_unit(tmp_path):
    pytest.importorskip("matplotlib")
    from fastbp import bench

    rows = [dict(workload=w, device=d, batch_size=b, seconds=s, unit=bench.WORKLOADS[w]["unit"])
            for w, sizes in (("W1", (100, 1000)), ("W3", (32, 128))) for d in ("cpu", "cuda")
            for b, s in zip(sizes, (0.2, 0.1))]
    fig = bench.plot(rows, tmp_path / "p.png")
    w1, w3 = fig.axes
    assert w1.get_ylabel() == "seconds per 1000-epoch fit" and "full batch" in w1.get_xlabel()
    assert w3.get_ylabel() == "seconds per epoch" and w3.get_xlabel() == "batch size"
    assert [line.get_label() for line in w3.get_lines()] == ["cpu", "cuda"]
