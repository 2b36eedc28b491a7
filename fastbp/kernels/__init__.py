"""Compiled kernels: ``pointwise`` (math written once for both targets), ``cpu`` (@njit) and ``cuda`` (@cuda.jit).

``cpu`` and ``cuda`` export the same kernel names with the same signatures (outputs first); a side-by-side
read shows only how the work is parallelised.
"""
