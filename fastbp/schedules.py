"""Learning-rate schedules: callables ``epoch -> lr`` (epoch counts from 0 across all fits of a Trainer).

``Trainer(lr=...)`` takes a number (constant rate), one of these, or any callable ``epoch -> lr``.
They step once per epoch, like torch.optim.lr_scheduler's ExponentialLR, StepLR and CosineAnnealingLR.
:class:`ReduceLROnPlateau` is not a schedule but a fit callback that scales whatever the lr is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ._validation import check_float, check_int


@dataclass(frozen=True)
class Constant:
    """lr(epoch) = lr.

    >>> Constant(0.1)(7)
    0.1
    """

    lr: float

    def __call__(self, epoch: int) -> float:
        return self.lr


@dataclass(frozen=True)
class ExponentialDecay:
    """lr(epoch) = initial_lr * gamma ** epoch (torch's ExponentialLR).

    >>> [round(ExponentialDecay(0.1, gamma=0.5)(epoch), 4) for epoch in range(3)]
    [0.1, 0.05, 0.025]
    """

    initial_lr: float
    gamma: float

    def __call__(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** epoch


@dataclass(frozen=True)
class StepDecay:
    """lr(epoch) = initial_lr * gamma ** (epoch // step_size) (torch's StepLR).

    >>> [round(StepDecay(1.0, step_size=2, gamma=0.1)(epoch), 4) for epoch in range(5)]
    [1.0, 1.0, 0.1, 0.1, 0.01]
    """

    initial_lr: float
    step_size: int
    gamma: float = 0.1

    def __call__(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** (epoch // self.step_size)


@dataclass(frozen=True)
class CosineDecay:
    """Cosine annealing from ``initial_lr`` to ``eta_min`` over ``t_max`` epochs, after an optional linear warm-up.

    - warm-up, ``epoch < warmup_epochs``: ``initial_lr * (epoch + 1) / (warmup_epochs + 1)`` (it rises towards
      ``initial_lr`` and never starts at 0);
    - then, with ``e = epoch - warmup_epochs``: ``eta_min + (initial_lr - eta_min) * (1 + cos(pi * e / t_max)) / 2``
      for ``e <= t_max``: the closed form of torch's ``CosineAnnealingLR(T_max=t_max, eta_min=eta_min)``
      (torch's per-step recursive form agrees with it to float rounding up to ``T_max``);
    - ``eta_min`` for ``e > t_max``. Here the two differ on purpose: torch's recursive form keeps following the
      cosine past ``T_max`` (the rate climbs back to ``initial_lr`` by ``2 T_max``), while this holds ``eta_min``.

    With ``eta_min=0`` the rate is 0 from ``e = t_max`` on: those epochs leave the parameters unchanged.

    >>> [round(CosineDecay(1.0, t_max=2)(epoch), 4) for epoch in range(4)]
    [1.0, 0.5, 0.0, 0.0]
    >>> [round(CosineDecay(1.0, t_max=2, eta_min=0.1, warmup_epochs=3)(epoch), 4) for epoch in range(7)]
    [0.25, 0.5, 0.75, 1.0, 0.55, 0.1, 0.1]
    """

    initial_lr: float
    t_max: int
    eta_min: float = 0.0
    warmup_epochs: int = 0

    def __post_init__(self):
        # Checked in the order of the signature; each error names its argument. Stored as plain float / int.
        initial_lr = check_float("initial_lr", self.initial_lr, minimum=0.0, exclusive_minimum=True)
        t_max = check_int("t_max", self.t_max, minimum=1)
        eta_min = check_float("eta_min", self.eta_min, minimum=0.0)
        if eta_min > initial_lr:
            raise ValueError(f"eta_min must be <= initial_lr ({initial_lr}); got {eta_min}")
        warmup_epochs = check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        for name, value in (("initial_lr", initial_lr), ("t_max", t_max), ("eta_min", eta_min),
                            ("warmup_epochs", warmup_epochs)):
            object.__setattr__(self, name, value)

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        e = epoch - self.warmup_epochs
        if e > self.t_max:
            return self.eta_min
        # torch's CosineAnnealingLR._get_closed_form_lr, term for term.
        return self.eta_min + (self.initial_lr - self.eta_min) * (1 + math.cos(math.pi * e / self.t_max)) / 2


# -- reduce on plateau ---------------------------------------------------------------------------------------------
# torch's ReduceLROnPlateau eps: a reduction smaller than this is not applied.
PLATEAU_EPS = 1e-8


@dataclass(frozen=True)
class ReduceLROnPlateau:
    """A fit callback: multiply the learning rate by ``factor`` when the monitored loss stops improving.

    ``trainer.fit(X, y, epochs, callbacks=[fastbp.ReduceLROnPlateau(factor=0.5, patience=3)])``

    After every epoch it watches that epoch's validation loss when fit has ``validation_data``, the training
    loss otherwise, with the rule of torch's ``ReduceLROnPlateau(mode="min", threshold_mode="rel")``: an epoch
    improves when ``loss < best * (1 - threshold)`` (best starts at inf); after more than ``patience`` epochs
    without improvement the rate becomes ``max(lr * factor, min_lr)`` (applied only when that lowers it by more
    than 1e-8, as torch's eps), the bad-epoch count restarts and the next ``cooldown`` epochs count no bad
    epochs. It never stops training.

    How it changes the rate: the trainer holds a scale (``trainer.lr_scale``, 1.0 at first) that multiplies
    every epoch's rate, whether ``lr`` is a number or a schedule. A reduction multiplies the scale by
    ``new_lr / lr``, where ``lr`` is the rate of the epoch just finished. With a number lr that is exactly
    torch's rule (to float rounding). With a schedule the two combine multiplicatively, as torch's chainable
    schedulers do with ReduceLROnPlateau stepped first (equal to torch for ExponentialDecay and StepDecay,
    tested); ``min_lr`` bounds the rate a reduction sets, and a schedule that decays further afterwards may go
    below it. A later ``trainer.set_lr`` keeps the scale; ``trainer.lr_scale = 1.0`` undoes the reductions.

    This object holds only the settings; the state (best, num_bad_epochs, cooldown_counter, scale) is the
    trainer's, in ``trainer.state_dict()["trainer"]["plateau"]``: it is saved with ``trainer.save`` and goes on
    where it left off when a loaded trainer is given an equal callback.

    >>> rule = ReduceLROnPlateau(factor=0.5, patience=0)
    >>> state = plateau_state()
    >>> for loss in (1.0, 2.0):
    ...     state = rule.step(state, loss, lr=0.1 * state["scale"])
    >>> state["scale"], state["best"], state["num_bad_epochs"]
    (0.5, 1.0, 0)
    """

    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    cooldown: int = 0
    min_lr: float = 0.0

    def __post_init__(self):
        values = dict(
            factor=check_float("factor", self.factor, minimum=0.0, exclusive_minimum=True, maximum=1.0,
                               exclusive_maximum=True),
            patience=check_int("patience", self.patience, minimum=0),
            threshold=check_float("threshold", self.threshold, minimum=0.0, maximum=1.0, exclusive_maximum=True),
            cooldown=check_int("cooldown", self.cooldown, minimum=0),
            min_lr=check_float("min_lr", self.min_lr, minimum=0.0))
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def step(self, state: dict, loss: float, lr: float) -> dict:
        """The state after an epoch with this ``loss`` that trained with rate ``lr`` (a new dict)."""
        best = math.inf if state["best"] is None else state["best"]
        bad, cooldown_counter, scale = state["num_bad_epochs"], state["cooldown_counter"], state["scale"]
        loss = float(loss)
        if loss < best * (1.0 - self.threshold):
            best, bad = loss, 0
        else:
            bad += 1
        if cooldown_counter > 0:  # bad epochs during the cooldown are not counted
            cooldown_counter -= 1
            bad = 0
        if bad > self.patience:
            new_lr = max(lr * self.factor, self.min_lr)
            if lr - new_lr > PLATEAU_EPS:
                scale = scale * (new_lr / lr)
            cooldown_counter, bad = self.cooldown, 0
        return {"scale": scale, "best": None if math.isinf(best) else best, "num_bad_epochs": bad,
                "cooldown_counter": cooldown_counter}

    def __call__(self, trainer, history) -> None:
        """The callback: reads the epoch's loss and rate from this fit's history, updates the trainer's state."""
        loss = history.val_loss[-1] if history.val_loss else history.loss[-1]
        trainer._plateau = self.step(trainer._plateau, loss, history.lr[-1])


def plateau_state(spec: dict | None = None) -> dict:
    """ReduceLROnPlateau's state as the trainer holds it (plain JSON-able values; best None means inf, not yet
    set): the initial state for None, otherwise ``spec`` checked."""
    if spec is None:
        return {"scale": 1.0, "best": None, "num_bad_epochs": 0, "cooldown_counter": 0}
    if not isinstance(spec, dict):
        raise ValueError(f"plateau must be a dict; got {type(spec).__name__}")
    for name in ("scale", "best", "num_bad_epochs", "cooldown_counter"):
        if name not in spec:
            raise ValueError(f"plateau lacks the field {name!r}")
    return {"scale": check_float("plateau scale", spec["scale"], minimum=0.0, exclusive_minimum=True),
            "best": check_float("plateau best", spec["best"], allow_none=True),
            "num_bad_epochs": check_int("plateau num_bad_epochs", spec["num_bad_epochs"], minimum=0),
            "cooldown_counter": check_int("plateau cooldown_counter", spec["cooldown_counter"], minimum=0)}


# -- as plain data (for state dicts and checkpoint files) ---------------------------------------------------------
BUILT_IN = {cls.__name__: cls for cls in (Constant, ExponentialDecay, StepDecay, CosineDecay)}


def to_spec(lr) -> dict:
    """A learning rate as plain data: ``{"type": "number", "value"}``, a built-in schedule's name and fields,
    or ``{"type": "custom", "repr"}`` for any other callable (which cannot be stored: see :func:`from_spec`)."""
    if type(lr) in BUILT_IN.values():
        return {"type": type(lr).__name__} | dataclasses.asdict(lr)
    if callable(lr):
        return {"type": "custom", "repr": repr(lr)[:200]}
    return {"type": "number", "value": float(lr)}


def from_spec(spec: dict):
    """The learning rate a :func:`to_spec` dict describes (a number or a built-in schedule); ValueError for a
    custom callable, which only its owner can supply again."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"lr must be a dict with a 'type'; got {spec!r:.100}")
    kind = spec["type"]
    if kind == "number":
        return check_float("lr", spec.get("value"), minimum=0.0, exclusive_minimum=True)
    if kind == "custom":
        raise ValueError(f"this state was saved with a custom learning-rate callable ({spec.get('repr', '?')}), "
                         "which cannot be stored; pass it again: fastbp.Trainer.load(path, lr=your_schedule)")
    if kind not in BUILT_IN:
        raise ValueError(f"unknown learning-rate schedule {kind!r}")
    cls = BUILT_IN[kind]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in spec:
            raise ValueError(f"lr ({kind}) lacks the field {f.name!r}")
        # Each field by its annotated type (a string here: annotations are postponed); a schedule that checks
        # its own ranges (CosineDecay) does so again when constructed.
        if f.type == "int":
            kwargs[f.name] = check_int(f.name, spec[f.name], minimum=1 if f.name == "step_size" else None)
        else:
            kwargs[f.name] = check_float(f.name, spec[f.name])
    return cls(**kwargs)
