"""What an engine is: the contract between the estimators and the engines."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dampers import BaseDamper, TrainState


@dataclass(frozen=True)
class TrainConfig:
    """The estimator's settings that decide how updates are computed."""

    seed: int
    max_batch_size: int | None = None
    worker_max_batch_size: int | None = None
    grads_per_worker: int = 32
    min_workers: int = 1
    max_workers: int | None = None
    device: str = "cpu"


@dataclass
class UpdateRecord:
    """What one model update did; the estimator writes it to ``history_``."""

    damping: float
    batch_size: int
    lr: float
    workers: int
    loss: float
    duration: float
    grad_stats: dict[str, float] = field(default_factory=dict)


OnUpdate = Callable[[UpdateRecord], None]


class Engine:
    """Computes the model updates of a fit.

    The estimator calls :meth:`start` once per fit with its module, optimizer,
    criterion and training tensors, then :meth:`run_epoch` once per epoch,
    then :meth:`close`. When :meth:`run_epoch` returns, the estimator's
    ``module`` and ``optimizer`` hold the epoch's result (so validation,
    checkpoints and callbacks see it), and ``state`` has been advanced.
    Engines never import the estimators.
    """

    name = "base"

    def __init__(self, config: TrainConfig):
        self.config = config

    def start(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever :meth:`start` acquired (idempotent)."""
