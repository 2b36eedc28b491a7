"""python -m fastbp info: runs, reports every item, and explains why CUDA is not usable."""
import json
import os
import subprocess
import sys

import fastbp
from fastbp import info


def test_info_command_runs(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastbp.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-m", "fastbp", "info"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for word in ("fastbp", "numba", "numba-cuda", "numpy", "threading", "threads", "cache", "cuda"):
        assert word in result.stdout
    assert str(tmp_path / "cache") in result.stdout and "(writable)" in result.stdout


def test_info_json(capsys):
    assert info.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fastbp"] == fastbp.__version__
    assert report["threading"]["threads"] >= 1 and report["threading"]["layer"]
    assert isinstance(report["cache"]["writable"], bool)
    cuda = report["cuda"]
    assert cuda["usable"] == (cuda["reason"] is None)
    if cuda["usable"]:
        assert cuda["device"] and cuda["compute_capability"]


def test_info_without_numba_cuda(monkeypatch):
    monkeypatch.setattr(info, "_version", lambda name: None if name == "numba-cuda" else "1.0")
    monkeypatch.setattr(info, "_cuda", lambda: {"usable": False, "reason": "the CUDA extra is not installed"})
    text = info.format_report(info.collect(probe_threads=False))
    assert "numba-cuda  not installed" in text
    assert "cuda        not usable: the CUDA extra is not installed" in text


def test_info_cache_disabled(monkeypatch):
    from fastbp import _jit

    monkeypatch.setattr(_jit, "CACHE_ENABLED", False)
    text = info.format_report(info.collect(probe_threads=False))
    assert "cache       none: disabled by FASTBP_CACHE" in text
