"""fastbp.kernels.gemm (the CPU product engine) beside numpy/OpenBLAS, one product at a time.

The implementation is the first parameter ("gemm" or "numpy", CPU only), then the product and the layer
(batch x n_in x n_out: W4's hidden layer and W3's first and output layers). gemm's calls include their
packing and fused epilogue (relu); numpy's are the bare product into a preallocated output.
python -m dev.bench_products times the same side by side, alternating, with thread counts.
"""
import time

import numpy as np

from .common import rng

IMPLEMENTATIONS = ["gemm", "numpy"]
PRODUCTS = ["forward", "weight_grad", "input_grad"]
LAYERS = ["512x1024x1024", "128x784x256", "128x256x10"]


class Products:
    params = (IMPLEMENTATIONS, PRODUCTS, LAYERS)
    param_names = ["implementation", "product", "layer"]
    timeout = 300

    def setup(self, implementation, product, layer):
        from fastbp.kernels import gemm
        from fastbp.kernels.pointwise import IDENTITY, RELU

        B, n_in, n_out = (int(v) for v in layer.split("x"))
        self.flops = 2.0 * B * n_in * n_out
        r = rng()
        inp = r.normal(size=(B, n_in)).astype(np.float32)
        w = r.normal(size=(n_in, n_out)).astype(np.float32)
        b = np.zeros(n_out, np.float32)
        dout = r.normal(size=(B, n_out)).astype(np.float32)
        panels = np.empty(gemm.workspace_size(B, n_in, n_out, np.float32), np.float32)
        out = np.empty((B, n_out), np.float32)
        dw, db = np.empty((n_in, n_out), np.float32), np.empty(n_out, np.float32)
        dinp, y = np.empty((B, n_in), np.float32), np.abs(inp)
        calls = {
            # gemm.product: the engine as the training drivers call it
            ("gemm", "forward"): lambda: gemm.product(gemm.FORWARD, RELU, out, inp, w, b, out, panels),
            ("numpy", "forward"): lambda: np.dot(inp, w, out=out),
            ("gemm", "weight_grad"): lambda: gemm.product(gemm.WEIGHT_GRAD, IDENTITY, dw, inp, dout, db, dw, panels),
            ("numpy", "weight_grad"): lambda: np.dot(inp.T, dout, out=dw),
            ("gemm", "input_grad"): lambda: gemm.product(gemm.INPUT_GRAD, RELU, dinp, dout, w, panels, y, panels),
            ("numpy", "input_grad"): lambda: np.dot(dout, w.T, out=dinp),
        }
        self.call = calls[implementation, product]
        self.call()  # JIT warm-up

    def time_product(self, implementation, product, layer):
        self.call()

    def track_gflops(self, implementation, product, layer):
        started = time.perf_counter()
        self.call()
        return self.flops / (time.perf_counter() - started) / 1e9

    track_gflops.unit = "GFLOP/s"
