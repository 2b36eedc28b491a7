"""Learning-rate schedules: callables ``epoch -> lr`` (epoch counts from 0 across all fits of a Trainer).

``Trainer(lr=...)`` takes a number (constant rate), one of these, or any callable ``epoch -> lr``.
They step once per epoch, like torch.optim.lr_scheduler's ExponentialLR and StepLR.
"""
from __future__ import annotations

import dataclasses
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


# -- as plain data (for state dicts and checkpoint files) ---------------------------------------------------------
BUILT_IN = {cls.__name__: cls for cls in (Constant, ExponentialDecay, StepDecay)}


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
        if f.name == "step_size":
            kwargs[f.name] = check_int(f.name, spec[f.name], minimum=1)
        else:
            kwargs[f.name] = check_float(f.name, spec[f.name])
    return cls(**kwargs)
