"""Training on the standard workloads W1-W4 (fastbp/bench.py defines them): what the speed targets are
about. W1's unit is its whole 1000-epoch training, the others' one epoch. W3 and W4 run on
common.REDUCED_SAMPLES samples (3840 and 1024 instead of 60000 and 16384) so a --quick run stays short;
track_samples_per_second is comparable with the full sizes.
"""
import time

from fastbp.bench import WORKLOADS, linear_init, make_data

from .common import DEVICES, REDUCED_SAMPLES, require


class TrainWorkload:
    params = (DEVICES, list(WORKLOADS))
    param_names = ["device", "workload"]
    timeout = 600

    def setup(self, device, workload):
        require(device)
        import fastbp

        spec = WORKLOADS[workload]
        self.X, self.y = make_data(workload, REDUCED_SAMPLES[workload])
        model = fastbp.MLP(spec["sizes"], spec["activation"], seed=0)
        weights, biases = linear_init(spec["sizes"])
        for layer in range(len(weights)):
            model.weights[layer][...] = weights[layer]
            model.biases[layer][...] = biases[layer]
        self.trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=spec["batch_size"],
                                      device=device, seed=0)
        self.epochs = spec["epochs"]
        self.trainer.fit(self.X, self.y, epochs=1)  # JIT warm-up (compilation or cache load), workspaces

    def run(self):
        self.trainer.fit(self.X, self.y, epochs=self.epochs)

    def time_train(self, device, workload):
        self.run()

    def peakmem_train(self, device, workload):
        self.run()

    def track_samples_per_second(self, device, workload):
        started = time.perf_counter()
        self.run()
        return self.X.shape[0] * self.epochs / (time.perf_counter() - started)

    track_samples_per_second.unit = "samples/s"
