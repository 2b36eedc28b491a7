"""One kernel at a time: dense forward, dense backward (weights and input), loss-gradient, optimizer step.

Shapes are layers of the workloads (W2's 32x64x128, W3's 128x784x256; W4's layers are in the training
benchmarks).
track_gflops reports the kernel's arithmetic rate (2 flops per multiply-add) from one timed call.
"""
import time

import numpy as np

from fastbp.kernels.pointwise import ACTIVATIONS, LOSSES, loss_divisor

from .common import DEVICES, kernels, require, rng, synchronize, to_device

LAYERS = ["32x64x128", "128x784x256"]


def _shape(layer):
    return tuple(int(v) for v in layer.split("x"))


class _Kernel:
    params = (DEVICES, LAYERS)
    param_names = ["device", "layer"]
    timeout = 120

    def setup(self, device, layer):
        require(device)
        self.device = device
        self.k = kernels(device)
        self.B, self.n_in, self.n_out = _shape(layer)
        self.prepare(rng())
        self.run()  # JIT warm-up
        synchronize(device)

    def timed(self):
        self.run()
        synchronize(self.device)

    def flops(self):
        return 2.0 * self.B * self.n_in * self.n_out

    def track_gflops(self, device, layer):
        started = time.perf_counter()
        self.timed()
        return self.flops() / (time.perf_counter() - started) / 1e9

    track_gflops.unit = "GFLOP/s"


class DenseForward(_Kernel):
    def prepare(self, r):
        B, n_in, n_out = self.B, self.n_in, self.n_out
        self.args = to_device(self.device, r.normal(size=(B, n_in)).astype(np.float32),
                              r.normal(size=(n_in, n_out)).astype(np.float32), np.zeros(n_out, np.float32),
                              np.empty((B, n_out), np.float32))

    def run(self):
        inp, w, b, out = self.args
        self.k.dense_forward(out, inp, w, b, ACTIVATIONS["relu"])

    def time_dense_forward(self, device, layer):
        self.timed()

    def peakmem_dense_forward(self, device, layer):
        self.timed()


class DenseBackward(_Kernel):
    def prepare(self, r):
        B, n_in, n_out = self.B, self.n_in, self.n_out
        self.args = to_device(self.device, r.normal(size=(B, n_in)).astype(np.float32),
                              r.normal(size=(n_in, n_out)).astype(np.float32),
                              r.normal(size=(B, n_out)).astype(np.float32),
                              np.empty((B, n_in), np.float32), np.empty((n_in, n_out), np.float32),
                              np.empty(n_out, np.float32))

    def run(self):
        inp, w, dout, dinp, dw, db = self.args
        self.k.dense_backward_params(dw, db, dout, inp)
        self.k.dense_backward_input(dinp, dout, w, inp, ACTIVATIONS["relu"])

    def flops(self):
        return 4.0 * self.B * self.n_in * self.n_out

    def time_dense_backward(self, device, layer):
        self.timed()

    def peakmem_dense_backward(self, device, layer):
        self.timed()


class LossGrad:
    params = (DEVICES, [32, 4096])
    param_names = ["device", "rows"]

    def setup(self, device, rows):
        require(device)
        self.device = device
        self.k = kernels(device)
        r = rng()
        k = 10
        targets = np.zeros((rows, k), np.float32)
        targets[np.arange(rows), r.integers(0, k, rows)] = 1
        self.args = to_device(device, np.empty((rows, k), np.float32), np.empty(rows, np.float32),
                              (3 * r.normal(size=(rows, k))).astype(np.float32), targets)
        self.loss = LOSSES["softmax_cross_entropy"]
        self.inv = np.float32(1.0 / loss_divisor(self.loss, rows, k))
        self.run()
        synchronize(device)

    def run(self):
        dlogits, row_losses, logits, targets = self.args
        self.k.loss_grad(dlogits, row_losses, logits, targets, self.loss, self.inv)
        synchronize(self.device)

    def time_loss_grad(self, device, rows):
        self.run()

    def peakmem_loss_grad(self, device, rows):
        self.run()

    def track_rows_per_second(self, device, rows):
        started = time.perf_counter()
        self.run()
        return rows / (time.perf_counter() - started)

    track_rows_per_second.unit = "rows/s"


class OptimizerStep:
    params = (DEVICES, ["sgd", "adam"], [9610, 2_110_474])  # W2 and W4 parameter counts
    param_names = ["device", "optimizer", "n_params"]

    def setup(self, device, optimizer, n_params):
        require(device)
        self.device = device
        self.k = kernels(device)
        r = rng()
        f = np.float32
        self.optimizer = optimizer
        self.args = to_device(device, r.normal(size=n_params).astype(f), np.zeros(n_params, f),
                              np.zeros(n_params, f), r.normal(size=n_params).astype(f))
        self.run()
        synchronize(device)

    def run(self):
        params, m, v, grads = self.args
        f = np.float32
        if self.optimizer == "sgd":
            self.k.sgd_update(params, m, grads, f(0.01), f(0.9), f(0.0), f(0.0), False, False)
        else:
            self.k.adam_update(params, m, v, grads, f(0.001), f(0.9), f(0.999), f(1e-8), f(0.0), f(0.01), f(0.03),
                               f(1.0))
        synchronize(self.device)

    def time_step(self, device, optimizer, n_params):
        self.run()

    def peakmem_step(self, device, optimizer, n_params):
        self.run()

    def track_params_per_second(self, device, optimizer, n_params):
        started = time.perf_counter()
        self.run()
        return n_params / (time.perf_counter() - started)

    track_params_per_second.unit = "params/s"
