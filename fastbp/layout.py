"""Where each layer's numbers live in fastbp's flat buffers (host side, shared by both targets).

Parameters: one vector ``W0.ravel(), b0, W1.ravel(), b1, ...``; layer l's weight starts at
``param_offsets[l]`` and its bias right after it. Batch workspaces (activations, deltas) hold
``capacity * sum(sizes)`` numbers; layer l's (rows, sizes[l]) slot starts at ``capacity * unit_offsets[l]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    sizes: np.ndarray  # (L + 1,) int64: layer widths, input first
    param_offsets: np.ndarray  # (L,) int64: start of each layer's weight in the flat parameter vector
    unit_offsets: np.ndarray  # (L + 2,) int64: cumulative widths; slot l of a workspace row block
    n_params: int

    @classmethod
    def from_sizes(cls, sizes) -> "Layout":
        sizes = np.asarray(sizes, dtype=np.int64)
        per_layer = sizes[:-1] * sizes[1:] + sizes[1:]
        param_offsets = np.concatenate(([0], np.cumsum(per_layer)[:-1])).astype(np.int64)
        unit_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        return cls(sizes, param_offsets, unit_offsets, int(per_layer.sum()))

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def workspace_size(self, capacity: int) -> int:
        return int(capacity * self.unit_offsets[-1])

    def pack(self, weights, biases, out: np.ndarray) -> np.ndarray:
        """Copy per-layer arrays into the flat vector ``out`` (P,)."""
        for layer, (w, b) in enumerate(zip(weights, biases)):
            start = self.param_offsets[layer]
            stop = start + w.size
            out[start:stop] = w.ravel()
            out[stop:stop + b.size] = b
        return out

    def unpack(self, flat: np.ndarray, weights, biases) -> None:
        """Copy the flat vector back INTO the existing per-layer arrays (in place: user views stay valid)."""
        for layer, (w, b) in enumerate(zip(weights, biases)):
            wv, bv = self.views(flat, layer)
            w[...] = wv
            b[...] = bv

    def views(self, flat: np.ndarray, layer: int):
        """(weight (n_in, n_out), bias (n_out,)) views of layer ``layer`` inside a flat vector."""
        n_in, n_out = int(self.sizes[layer]), int(self.sizes[layer + 1])
        start = int(self.param_offsets[layer])
        weight = flat[start:start + n_in * n_out].reshape(n_in, n_out)
        bias = flat[start + n_in * n_out:start + n_in * n_out + n_out]
        return weight, bias
