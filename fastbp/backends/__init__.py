"""Host-side drivers of each target: they own the flat buffers and call the kernels.

Every backend has the same interface (see ``cpu.CPUBackend``); the Trainer picks one once, by device
name, through :func:`create_backend`, and never branches on the device again.
"""
from __future__ import annotations

import importlib

DEVICES = ("cpu", "cuda", "auto")
# fastbp is installed from a clone or a wheel built from one (it is not on PyPI): how to add the cuda extra.
CUDA_EXTRA_INSTALL = "pip install -e '.[cuda]' in the fastbp clone (or the fastbp wheel with [cuda])"
# Whether a trainer on this device (as named by the user) may make compiled CPU calls, the calls that
# Trainer(n_threads=) sizes: "auto" may pick the CPU, so n_threads applies there.
MAKES_CPU_CALLS = {"cpu": True, "cuda": False, "auto": True}


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA target can be used here, otherwise why not and how to fix it."""
    try:
        cuda_backend = importlib.import_module(__name__ + ".cuda")
    except ModuleNotFoundError as error:
        if error.name == __name__ + ".cuda":
            return "this fastbp build has no CUDA target"
        return (f"the CUDA extra is not installed ({error}); install it with: {CUDA_EXTRA_INSTALL}")
    return cuda_backend.unavailable_reason()


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda' when a usable GPU is present and 'cpu' otherwise; 'cuda' without one raises."""
    if device == "auto":
        return "cuda" if cuda_unavailable_reason() is None else "cpu"
    if device == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"device='cuda' cannot be used: {reason}. Use device='cpu' or device='auto'.")
    return device


def create_backend(device: str, **spec):
    """A backend for a resolved device name ('cpu' or 'cuda')."""
    if device == "cuda":
        from .cuda import CUDABackend

        return CUDABackend(**spec)
    from .cpu import CPUBackend

    return CPUBackend(**spec)
