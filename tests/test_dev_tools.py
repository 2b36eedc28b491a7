"""The CPU development tools under dev/ that no CI step runs (they time things): each one's runners still call
fastbp as it is today, and agree with each other on what they compute. (dev.bench_narrow's default mode broke
when the backend began running narrow networks on the fused kernel itself: its runner that routed them there by
hand no longer matched the backend's interface, and nothing ran it.)"""
import numpy as np

from dev import bench_narrow


def test_bench_narrow_runners_train_w1_alike():
    fastbp_runners = set(bench_narrow.RUNNERS) - {"pytorch", "jax"}  # every runner of fastbp's, not the peers
    times, runners = bench_narrow.compare(rounds=1, min_seconds=0.0, dtype=np.float32, only=fastbp_runners)
    assert set(times) == fastbp_runners >= {"narrow kernel", "cpu kernel", "Trainer.fit"}
    assert all(len(t) == 1 and t[0] > 0 for t in times.values())
    narrow_losses = runners["narrow kernel"].losses
    fit_losses = np.asarray(runners["Trainer.fit"].history.loss)
    engine_losses = runners["cpu kernel"].losses
    assert narrow_losses.shape == fit_losses.shape == engine_losses.shape == (1000,)
    # Trainer.fit runs W1 on the same fused kernel, from the same weights: the same losses, epoch by epoch.
    np.testing.assert_allclose(fit_losses, narrow_losses, rtol=1e-6)
    # The product engine computes the same training in another order of operations.
    np.testing.assert_allclose(engine_losses, narrow_losses, rtol=1e-3)
    assert engine_losses[-1] < engine_losses[0]  # it trained
    table = bench_narrow.format_compare(times, np.float32)
    assert "Trainer.fit" in table and "vs Trainer.fit" in table
