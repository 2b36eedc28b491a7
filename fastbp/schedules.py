"""Learning-rate schedules: callables ``epoch -> lr`` (epoch counts from 0 across all fits of a Trainer).

``Trainer(lr=...)`` takes a number (constant rate), one of these, or any callable ``epoch -> lr``.
They step once per epoch, like torch.optim.lr_scheduler's ExponentialLR and StepLR.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constant:
    """lr(epoch) = lr."""

    lr: float

    def __call__(self, epoch: int) -> float:
        return self.lr


@dataclass(frozen=True)
class ExponentialDecay:
    """lr(epoch) = initial_lr * gamma ** epoch (torch's ExponentialLR)."""

    initial_lr: float
    gamma: float

    def __call__(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** epoch


@dataclass(frozen=True)
class StepDecay:
    """lr(epoch) = initial_lr * gamma ** (epoch // step_size) (torch's StepLR)."""

    initial_lr: float
    step_size: int
    gamma: float = 0.1

    def __call__(self, epoch: int) -> float:
        return self.initial_lr * self.gamma ** (epoch // self.step_size)
