"""A long-running server's predicts: requests of many sizes on one trained model (issue 27, part 3).

peakmem_predict_many_sizes is the process's peak memory after 40 predicts of distinct sizes (1 to 4096 rows)
on a 512-512-512-10 network; the CPU backend keeps at most a few workspaces of power-of-two capacities, so it
stays bounded (before, every distinct size kept its own workspace). track_workspaces_kept counts them.
"""
import numpy as np

from .common import require, rng

SIZES = [int(n) for n in rng().choice(np.arange(1, 4097), 40, replace=False)]


class PredictManySizes:
    params = (["cpu"],)
    param_names = ["device"]
    timeout = 300

    def setup(self, device):
        require(device)
        import fastbp

        self.trainer = fastbp.Trainer(fastbp.MLP([512, 512, 512, 10], "relu", seed=0),
                                      loss="softmax_cross_entropy", device=device)
        self.X = rng().normal(size=(max(SIZES), 512)).astype(np.float32)
        self.trainer.predict(self.X[:1])  # JIT warm-up (compilation or cache load)

    def run(self):
        for n in SIZES:
            self.trainer.predict(self.X[:n])

    def time_predict_many_sizes(self, device):
        self.run()

    def peakmem_predict_many_sizes(self, device):
        self.run()

    def track_workspaces_kept(self, device):
        self.run()
        return len(self.trainer._backend._workspaces)

    track_workspaces_kept.unit = "workspaces"
