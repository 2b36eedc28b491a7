"""CosineDecay against torch.optim.lr_scheduler, the independent reference.

torch's schedulers are stepped once per epoch on a one-parameter SGD optimizer, exactly as a torch training
loop would; their learning rates (and the plateau counters) must equal ours, to float rounding.
"""
import math
import warnings

import numpy as np
import pytest

import fastbp
from fastbp import schedules

torch = pytest.importorskip("torch")


def torch_optimizer(lr: float):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def torch_lrs(scheduler_factory, lr: float, epochs: int) -> list:
    """The rate of each epoch 0..epochs-1 under a torch scheduler stepped once per epoch."""
    optimizer = torch_optimizer(lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "scheduler.step() before optimizer.step()" and the like
        scheduler = scheduler_factory(optimizer)
        lrs = []
        for _ in range(epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return lrs


def regression(n=256, n_in=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_in))
    y = np.sin(X[:, 0]) + 0.5 * rng.normal(size=n)  # noise: the loss stops improving
    return X, y


# -- CosineDecay --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("initial_lr,t_max,eta_min", [(0.1, 10, 0.0), (0.5, 7, 0.01), (1.0, 1, 0.0),
                                                      (0.03, 50, 0.001)])
def test_cosine_equals_torch_up_to_t_max(initial_lr, t_max, eta_min):
    schedule = fastbp.CosineDecay(initial_lr, t_max=t_max, eta_min=eta_min)
    ref = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min),
                    initial_lr, t_max + 1)
    ours = [schedule(epoch) for epoch in range(t_max + 1)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15 * initial_lr)
    assert ours[0] == initial_lr and ours[t_max] == pytest.approx(eta_min, abs=1e-16)


def test_cosine_holds_eta_min_past_t_max_where_torch_climbs_back():
    schedule = fastbp.CosineDecay(0.1, t_max=4, eta_min=0.01)
    ref = torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01), 0.1, 12)
    assert [schedule(epoch) for epoch in range(5, 12)] == [0.01] * 7
    assert ref[6] > 0.03 and ref[8] == pytest.approx(0.1)  # torch's recursive form follows the cosine back up


@pytest.mark.parametrize("warmup", [2, 3, 5])
def test_cosine_warmup_equals_torch_linear_then_cosine(warmup):
    # torch's own composition: LinearLR from 1/(w+1) to w/(w+1) over w-1 steps, then CosineAnnealingLR.
    initial_lr, t_max, eta_min = 0.2, 6, 0.02
    schedule = fastbp.CosineDecay(initial_lr, t_max=t_max, eta_min=eta_min, warmup_epochs=warmup)

    def factory(opt):
        linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (warmup + 1),
                                                   end_factor=warmup / (warmup + 1), total_iters=warmup - 1)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
        return torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])

    ref = torch_lrs(factory, initial_lr, warmup + t_max + 1)
    ours = [schedule(epoch) for epoch in range(warmup + t_max + 1)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[:warmup] == [initial_lr * (e + 1) / (warmup + 1) for e in range(warmup)]


def test_cosine_worked_example():
    # t_max = 4: cos(pi e / 4) = 1, 0.7071, 0, -0.7071, -1 -> (1 + cos) / 2 = 1, 0.8536, 0.5, 0.1464, 0.
    # With initial_lr 1.1 and eta_min 0.1: 0.1 + 1.0 * that. One warm-up epoch first: 1.1 * 1/2 = 0.55.
    schedule = fastbp.CosineDecay(1.1, t_max=4, eta_min=0.1, warmup_epochs=1)
    assert [round(schedule(epoch), 4) for epoch in range(7)] == [0.55, 1.1, 0.9536, 0.6, 0.2464, 0.1, 0.1]


def test_trainer_records_cosine_rates_across_fits_and_zero_rate_epochs_change_nothing():
    X, y = regression()
    schedule = fastbp.CosineDecay(0.05, t_max=3, eta_min=0.0, warmup_epochs=1)
    trainer = fastbp.Trainer(fastbp.MLP([4, 16, 1], "tanh", seed=0), loss="mse", lr=schedule, seed=0)
    trainer.fit(X, y, epochs=2)
    history = trainer.fit(X, y, epochs=3)  # the schedule's clock runs across fits
    after_epoch_4 = [w.copy() for w in trainer.model.weights]
    assert history.lr == [schedule(epoch) for epoch in (2, 3, 4)]
    assert trainer.history.lr == [schedule(epoch) for epoch in range(5)]
    assert trainer.history.lr[4] == 0.0  # e = t_max with eta_min = 0
    trainer.fit(X, y, epochs=2)  # epochs 5 and 6: rate 0
    for w, before in zip(trainer.model.weights, after_epoch_4):
        np.testing.assert_array_equal(w, before)


def test_cosine_is_stored_in_checkpoints(tmp_path):
    X, y = regression()
    schedule = fastbp.CosineDecay(0.05, t_max=8, eta_min=0.001, warmup_epochs=2)
    trainer = fastbp.Trainer(fastbp.MLP([4, 8, 1], seed=0), loss="mse", lr=schedule, seed=0)
    trainer.fit(X, y, epochs=3)
    assert trainer.state_dict()["trainer"]["lr"] == {"type": "CosineDecay", "initial_lr": 0.05, "t_max": 8,
                                                     "eta_min": 0.001, "warmup_epochs": 2}
    trainer.save(tmp_path / "t.npz")
    loaded = fastbp.Trainer.load(tmp_path / "t.npz")
    assert loaded.lr == schedule and type(loaded.lr.t_max) is int
    assert loaded.fit(X, y, epochs=4).lr == trainer.fit(X, y, epochs=4).lr


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(initial_lr=0.0, t_max=5), ValueError, r"initial_lr must be > 0.0; got 0.0"),
    (dict(initial_lr="0.1", t_max=5), TypeError, r"initial_lr must be a real number; got str"),
    (dict(initial_lr=math.nan, t_max=5), ValueError, r"initial_lr must be finite; got nan"),
    (dict(initial_lr=0.1, t_max=0), ValueError, r"t_max must be >= 1; got 0"),
    (dict(initial_lr=0.1, t_max=2.5), TypeError, r"t_max must be an integer; got float 2.5"),
    (dict(initial_lr=0.1, t_max=5, eta_min=-0.1), ValueError, r"eta_min must be >= 0.0; got -0.1"),
    (dict(initial_lr=0.1, t_max=5, eta_min=0.2), ValueError, r"eta_min must be <= initial_lr \(0.1\); got 0.2"),
    (dict(initial_lr=0.1, t_max=5, warmup_epochs=-1), ValueError, r"warmup_epochs must be >= 0; got -1"),
    (dict(initial_lr=0.1, t_max=5, warmup_epochs=True), TypeError, r"warmup_epochs must be an integer; got bool"),
])
def test_cosine_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastbp.CosineDecay(**kwargs)


def test_cosine_spec_is_checked_on_load():
    spec = schedules.to_spec(fastbp.CosineDecay(0.1, t_max=5))
    assert schedules.from_spec(spec) == fastbp.CosineDecay(0.1, t_max=5)
    with pytest.raises(ValueError, match=r"t_max must be >= 1; got 0"):
        schedules.from_spec(spec | {"t_max": 0})
    with pytest.raises(TypeError, match=r"warmup_epochs must be an integer; got float"):
        schedules.from_spec(spec | {"warmup_epochs": 1.5})
    with pytest.raises(ValueError, match=r"lacks the field 'eta_min'"):
        schedules.from_spec({k: v for k, v in spec.items() if k != "eta_min"})
