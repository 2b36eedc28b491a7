"""Learning-rate schedules: callables ``epoch -> lr`` (epoch counts from 0 across all fits of a Trainer).

``Trainer(lr=...)`` takes a number (constant rate), one of these, or any callable ``epoch -> lr``.
They step once per epoch, like torch.optim.lr_scheduler's ExponentialLR and StepLR.
"""
from __future__ import annotations

from dataclasses import dataclass


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
