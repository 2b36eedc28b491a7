"""fastbp's asv suite (run from this folder: asv machine --yes && asv run --python=same --quick).

The environment is "existing" (the current Python), so the suite benchmarks the fastbp of THIS checkout:
the repository root goes first on sys.path (asv does not pass PYTHONPATH through, and the fastbp that
is installed may be another checkout).
"""
import os
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_root, "fastbp")) and _root not in sys.path:
    sys.path.insert(0, _root)
