"""fastbp: JIT-compiled backpropagation kernels for dense networks, on the CPU (numba) and NVIDIA GPUs.

>>> import numpy as np, fastbp
>>> model = fastbp.MLP([64, 128, 10], activation="relu", seed=0)
>>> trainer = fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer="sgd", lr=0.1, batch_size=32)

Importing fastbp compiles nothing: kernels compile on first use and are cached on disk
(``fastbp.precompile()`` or ``python -m fastbp precompile`` fills that cache ahead of time). A call that
compiles for more than a second says so once, in one line on stderr (``FASTBP_QUIET_COMPILE=1`` hides it);
``fastbp.compile_seconds()`` counts the seconds spent compiling.
"""
from . import _standby

_standby.start()  # where the kernel cache is cold: a compile helper gets ready while the rest imports
from ._compile_notice import compile_seconds
from ._version import __version__
from .checkpoint import CheckpointError
from .model import MLP
from .progress import ProgressBar
from .schedules import Constant, CosineDecay, ExponentialDecay, ReduceLROnPlateau, StepDecay
from .trainer import History, LearningRateSearch, NonFiniteLossError, Trainer
from .warm_cache import precompile

__all__ = ["MLP", "Trainer", "History", "LearningRateSearch", "NonFiniteLossError", "CheckpointError",
           "ProgressBar", "Constant", "ExponentialDecay", "StepDecay", "CosineDecay", "ReduceLROnPlateau",
           "precompile", "compile_seconds", "__version__"]
