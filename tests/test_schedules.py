"""CosineDecay and ReduceLROnPlateau against torch.optim.lr_scheduler, the independent reference.

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


# -- ReduceLROnPlateau: the rule ----------------------------------------------------------------------------------
LOSS_SEQUENCES = {
    # improvements, ties (not an improvement), tiny relative gains below the threshold, a late drop
    "scripted": [1.0, 0.9, 0.9, 0.95, 0.89995, 0.91, 0.92, 0.93, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.49, 0.6, 0.6,
                 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
    # a noisy decay that flattens out
    "noisy": (np.exp(-np.arange(80) / 10) + 0.5 + 0.02 * np.random.default_rng(1).normal(size=80)).tolist(),
    # flat: reductions down to min_lr
    "flat": [1.0] * 60,
}
PLATEAU_SETTINGS = [
    dict(),
    dict(factor=0.5, patience=2),
    dict(factor=0.5, patience=0),
    dict(factor=0.3, patience=1, cooldown=2),
    dict(factor=0.5, patience=2, threshold=0.05, cooldown=1, min_lr=0.02),
    dict(factor=0.1, patience=0, min_lr=0.001),  # min_lr reached from above
    dict(factor=0.9, patience=3, threshold=0.0, cooldown=4),
]


@pytest.mark.parametrize("settings", PLATEAU_SETTINGS, ids=str)
@pytest.mark.parametrize("sequence", sorted(LOSS_SEQUENCES))
def test_plateau_rule_equals_torch(settings, sequence):
    losses, base_lr = LOSS_SEQUENCES[sequence], 0.1
    rule = fastbp.ReduceLROnPlateau(**settings)
    optimizer = torch_optimizer(base_lr)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", threshold_mode="rel", **settings)
    state = schedules.plateau_state()
    for loss in losses:
        lr = base_lr * state["scale"]  # a number lr: every epoch trains with lr * scale
        assert lr == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        state = rule.step(state, loss, lr)
        ref.step(loss)
        assert (state["best"], state["num_bad_epochs"], state["cooldown_counter"]) == (
            ref.best, ref.num_bad_epochs, ref.cooldown_counter)
    assert base_lr * state["scale"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


def test_plateau_sequences_do_reduce():
    # The comparison above must see reductions, cooldowns and the floor, or it tests little.
    rule = fastbp.ReduceLROnPlateau(factor=0.5, patience=2, threshold=0.05, cooldown=1, min_lr=0.02)
    state, scales = schedules.plateau_state(), []
    for loss in LOSS_SEQUENCES["flat"]:
        state = rule.step(state, loss, 0.1 * state["scale"])
        scales.append(state["scale"])
    assert len(set(scales)) == 4 and 0.1 * scales[-1] == pytest.approx(0.02)  # 0.1 -> 0.05 -> 0.025 -> 0.02


def test_plateau_worked_example():
    # patience 1, factor 0.5, cooldown 1, lr 1.0. Losses 3, 2, 2, 2, 2, 2, 2:
    # epoch 0, 1 improve (best 2); epoch 2 bad (1); epoch 3 bad (2 > patience): lr 0.5, cooldown 1;
    # epoch 4 bad but in cooldown (counter 1 -> 0, bad reset); epoch 5 bad (1); epoch 6 bad (2): lr 0.25.
    rule = fastbp.ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1)
    state, lrs = schedules.plateau_state(), []
    for loss in (3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0):
        lrs.append(1.0 * state["scale"])
        state = rule.step(state, loss, lrs[-1])
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5] and state["scale"] == 0.25


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(factor=1.0), ValueError, r"factor must be < 1.0; got 1.0"),
    (dict(factor=0.0), ValueError, r"factor must be > 0.0; got 0.0"),
    (dict(factor="0.5"), TypeError, r"factor must be a real number; got str"),
    (dict(patience=-1), ValueError, r"patience must be >= 0; got -1"),
    (dict(patience=2.0), TypeError, r"patience must be an integer; got float"),
    (dict(threshold=-1e-4), ValueError, r"threshold must be >= 0.0; got -0.0001"),
    (dict(threshold=1.0), ValueError, r"threshold must be < 1.0; got 1.0"),
    (dict(cooldown=-2), ValueError, r"cooldown must be >= 0; got -2"),
    (dict(min_lr=-0.1), ValueError, r"min_lr must be >= 0.0; got -0.1"),
    (dict(min_lr=math.inf), ValueError, r"min_lr must be finite; got inf"),
])
def test_plateau_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastbp.ReduceLROnPlateau(**kwargs)


# -- ReduceLROnPlateau in a fit -------------------------------------------------------------------------------------
def replay_in_torch(losses, lr, settings, gamma=None) -> list:
    """The rate of each epoch when torch's ReduceLROnPlateau (after torch's ExponentialLR when gamma is given,
    chained: plateau first, then the schedule) is fed these losses."""
    optimizer = torch_optimizer(lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", threshold_mode="rel", **settings)
    exponential = None if gamma is None else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loss in losses:
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            plateau.step(loss)
            if exponential is not None:
                exponential.step()
    return lrs


@pytest.mark.parametrize("validation", [True, False], ids=["val_loss", "train_loss"])
def test_plateau_in_fit_equals_torch(validation):
    X, y = regression(seed=0)
    X_val, y_val = regression(n=128, seed=1)
    settings = dict(factor=0.5, patience=2, threshold=0.01, cooldown=1, min_lr=0.004)
    trainer = fastbp.Trainer(fastbp.MLP([4, 16, 1], "tanh", seed=0), loss="mse", lr=0.05, batch_size=16, seed=0)
    history = trainer.fit(X, y, epochs=40, callbacks=[fastbp.ReduceLROnPlateau(**settings)],
                          validation_data=(X_val, y_val) if validation else None)
    watched = history.val_loss if validation else history.loss
    assert len(watched) == 40
    np.testing.assert_allclose(history.lr, replay_in_torch(watched, 0.05, settings), rtol=1e-12)
    assert len(set(history.lr)) >= 3  # it did reduce, more than once
    assert trainer.lr == 0.05 and trainer.lr_scale == pytest.approx(history.lr[-1] / 0.05)


def test_plateau_with_a_schedule_combines_like_torch_chaining():
    X, y = regression(seed=2)
    settings = dict(factor=0.5, patience=1, threshold=0.02, min_lr=0.01)
    trainer = fastbp.Trainer(fastbp.MLP([4, 16, 1], "tanh", seed=0), loss="mse",
                             lr=fastbp.ExponentialDecay(0.05, gamma=0.97), batch_size=16, seed=0)
    history = trainer.fit(X, y, epochs=40, callbacks=[fastbp.ReduceLROnPlateau(**settings)])
    np.testing.assert_allclose(history.lr, replay_in_torch(history.loss, 0.05, settings, gamma=0.97), rtol=1e-12)
    assert trainer.lr_scale < 0.5


def plateau_run(epochs_before_save, epochs_after, tmp_path=None, via="file"):
    """(trainer, lrs of every epoch): a fit with the plateau callback, optionally saved and resumed."""
    X, y = regression(seed=3)
    X_val, y_val = regression(n=64, seed=4)

    def callback():
        return fastbp.ReduceLROnPlateau(factor=0.5, patience=3, threshold=0.01, cooldown=2)

    trainer = fastbp.Trainer(fastbp.MLP([4, 12, 1], "tanh", seed=0), loss="mse", optimizer="adam", lr=0.02,
                             batch_size=32, seed=0)
    trainer.fit(X, y, epochs=epochs_before_save, validation_data=(X_val, y_val), callbacks=[callback()])
    if tmp_path is not None:
        if via == "file":
            trainer.save(tmp_path / "t.npz")
            trainer = fastbp.Trainer.load(tmp_path / "t.npz")
        else:
            state = trainer.state_dict()
            trainer = fastbp.Trainer(fastbp.MLP([4, 12, 1], "tanh", seed=5), loss="mse", optimizer="adam", lr=0.3)
            trainer.load_state_dict(state)
    trainer.fit(X, y, epochs=epochs_after, validation_data=(X_val, y_val), callbacks=[callback()])
    return trainer


@pytest.mark.parametrize("via", ["file", "state_dict"])
def test_plateau_state_survives_a_checkpoint_mid_plateau(tmp_path, via):
    straight = plateau_run(30, 0)
    lrs = straight.history.lr
    # Save at an epoch that is mid-plateau: after a reduction, with bad epochs or a cooldown pending.
    save_at = next(e for e in range(1, 30) if lrs[e] != lrs[0] and lrs[e + 1] == lrs[e])
    partial = plateau_run(save_at + 1, 0)
    state = partial.state_dict()["trainer"]["plateau"]
    assert state["scale"] < 1.0 and (state["num_bad_epochs"] or state["cooldown_counter"])
    resumed = plateau_run(save_at + 1, 30 - save_at - 1, tmp_path, via)
    assert resumed.history.lr == lrs
    assert resumed.history.val_loss == straight.history.val_loss
    assert resumed.state_dict()["trainer"]["plateau"] == straight.state_dict()["trainer"]["plateau"]
    for a, b in zip(resumed.model.weights, straight.model.weights):
        np.testing.assert_array_equal(a, b)


def test_state_without_plateau_loads_as_initial_and_bad_plateau_is_rejected():
    trainer = fastbp.Trainer(fastbp.MLP([2, 3, 1], seed=0), loss="mse", lr=0.1, seed=0)
    trainer.lr_scale = 0.25
    state = trainer.state_dict()
    assert state["trainer"]["plateau"] == {"scale": 0.25, "best": None, "num_bad_epochs": 0, "cooldown_counter": 0}
    old = state | {"trainer": {k: v for k, v in state["trainer"].items() if k != "plateau"}}
    assert fastbp.Trainer.from_state_dict(old).lr_scale == 1.0
    other = fastbp.Trainer(fastbp.MLP([2, 3, 1], seed=1), loss="mse", lr=0.1, seed=0)
    other.lr_scale = 0.5
    before = other.state_dict()
    for bad, message in [({"scale": 0.0}, r"plateau scale must be > 0.0"),
                         ({"best": "x"}, r"plateau best must be a real number"),
                         ({"num_bad_epochs": -1}, r"plateau num_bad_epochs must be >= 0")]:
        broken = state | {"trainer": state["trainer"] | {"plateau": state["trainer"]["plateau"] | bad}}
        with pytest.raises((TypeError, ValueError), match=message):
            other.load_state_dict(broken)
        after = other.state_dict()  # a rejected load changes nothing
        assert after["trainer"]["plateau"] == before["trainer"]["plateau"]
        np.testing.assert_array_equal(other.model.weights[0], before["model"]["weights"][0])


def test_lr_scale_multiplies_a_later_lr_and_is_checked():
    X, y = regression()
    trainer = fastbp.Trainer(fastbp.MLP([4, 8, 1], seed=0), loss="mse", lr=0.1, seed=0)
    trainer.lr_scale = 0.5
    trainer.set_lr(0.04)
    assert trainer.fit(X, y, epochs=2).lr == [0.02, 0.02]
    for bad, error in [(0.0, ValueError), (-1.0, ValueError), ("1", TypeError), (math.nan, ValueError)]:
        with pytest.raises(error, match=r"lr_scale must be"):
            trainer.lr_scale = bad
        assert trainer.lr_scale == 0.5
