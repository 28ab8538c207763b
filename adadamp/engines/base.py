"""What an engine is: the contract between the estimators and the engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..dampers import BaseDamper
from ..examples import Examples
from ..scaling import workers_for
from ..state import TrainState


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
    epochs: int | None = None
    """How many epochs the fit runs: engines plan the workers a schedule needs ahead."""
    lr_scaling: str = "none"
    """How the learning rate follows the batch size (:func:`adadamp.gns.lr_gain`)."""

    def needs_grad_stats(self, damper: BaseDamper) -> bool:
        """Whether updates compute the gradient statistics: the damper or AdaScale reads them."""
        return damper.needs_grad_stats or self.lr_scaling == "adascale"

    def computes_stats(self, damper: BaseDamper, span: int) -> bool:
        """Whether an update whose estimates stand for ``span`` updates computes the statistics.

        A lone rank between its splits (``span`` 0, see
        :func:`~adadamp.engines._step.stats_span`) estimates nothing, and the
        squared norm of its gradient would cost 4% of a small model's update
        for a value only a damper with ``needs_grad_norm`` reads.
        """
        return self.needs_grad_stats(damper) and (span > 0 or damper.needs_grad_norm)

    def plans_read_model(self, damper: BaseDamper) -> bool:
        """Whether an update's plan depends on the updates before it (no planning ahead)."""
        return damper.adaptive or self.lr_scaling == "adascale"

    def workers_for(self, batch_size: int) -> int:
        """The worker count an update of ``batch_size`` examples wants."""
        return workers_for(batch_size, self.grads_per_worker, self.min_workers, self.max_workers)


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

    The estimator calls :meth:`start` once per fit with its settings, module,
    optimizer, criterion, training examples and Dask ``client`` argument,
    then :meth:`run_epoch` once per epoch, then :meth:`close`. When
    :meth:`run_epoch` returns, the estimator's ``module`` and ``optimizer``
    hold the epoch's result (so validation, checkpoints and callbacks see
    it), and ``state`` has been advanced. An engine object may serve several
    fits in turn (``backend=`` takes an instance); engines never import the
    estimators.

    Attributes
    ----------
    fit_id : str or None
        The name under which the Dask workers file the current fit's module
        and data; None for an engine that runs in this process.
    """

    name = "base"
    fit_id: str | None = None

    def start(
        self,
        config: TrainConfig,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        examples: Examples,
        client: Any = None,
    ) -> None:
        raise NotImplementedError

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        raise NotImplementedError

    def drain_rescales(self) -> list[dict]:
        """The rescales since the last call: ``{"update", "from", "to", "seconds"}`` each.

        ``seconds`` is how long training stalled for it. In-process engines never rescale.
        """
        return []

    def close(self) -> None:
        """Release whatever :meth:`start` acquired (idempotent)."""
