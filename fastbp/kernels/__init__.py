"""Compiled kernels: ``pointwise`` (math written once for both targets), ``cpu`` (@njit) and ``cuda`` (@cuda.jit).

The shared vocabulary: ``dense_forward``, ``dense_backward_params``, ``dense_backward_input``,
``dense_backward``, ``loss_grad``, ``output_transform``, ``sgd_update``, ``adam_update`` and ``gather_rows``
have the same names and signatures (outputs first) in ``cpu`` and ``cuda``. Beyond it each module has what
its target needs: ``cpu`` the whole-step drivers that run many epochs in one compiled call on the product
engine (``gemm``: every dense-layer product; ``narrow`` is the fused kernel for narrow networks' fits);
``cuda`` the launches the CPU does inline (``sum_into``, ``add_into``, ``array_stats``).

Activations, their derivatives, the optimizer element updates and the row form of the fused loss-gradient
are written once, in ``pointwise``, and inlined by both targets; the CPU's ``loss_grad`` spells the same
arithmetic out over a whole (B, k) block for mse and softmax cross-entropy (see its docstring for why).

The public API (see ``fastbp/kernels/API.md``): this package re-exports the CPU kernels of ``cpu.__all__``,
the codes and inline functions of ``pointwise.__all__`` and ``Layout``, for use from a user's own ``@njit``
code::

    from fastbp.kernels import TANH, dense_forward, weight_view, bias_view

The CPU names are imported on first use (``import fastbp`` stays as cheap as before); nothing here imports
the CUDA target.
"""
from __future__ import annotations

from ..layout import Layout
from . import pointwise
from .pointwise import *  # noqa: F403 (the names of pointwise.__all__)

# cpu.__all__, written out so that the lazy import below needs no import of cpu to know its names
# (tests/test_kernels_api.py checks the two lists agree).
_CPU_NAMES = (
    "dense_forward", "dense_backward_params", "dense_backward_input", "dense_backward", "loss_grad",
    "output_transform", "sgd_update", "adam_update", "gather_rows",
    "dense_forward_naive", "dense_backward_params_naive", "dense_backward_input_naive",
    "weight_view", "bias_view", "activation_view",
)

__all__ = [*_CPU_NAMES, *pointwise.__all__, "Layout"]


def __getattr__(name):
    # PEP 562: the first `from fastbp.kernels import dense_forward` imports the cpu module (about 20 ms of
    # numba dispatcher set-up), not `import fastbp`.
    if name in _CPU_NAMES:
        from . import cpu

        return getattr(cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
