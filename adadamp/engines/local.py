"""The in-process engine: no Dask, one rank. The reference the others must match."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dampers import BaseDamper
from ..examples import Examples, close, set_epoch
from ..schedule import epoch_permutation
from ..state import TrainState
from ._loop import RankModel, Reducer, run_updates
from .base import Engine, OnUpdate, TrainConfig


class LocalEngine(Engine):
    """Computes every update in this process, on the estimator's own module."""

    name = "local"

    def start(
        self,
        config: TrainConfig,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        examples: Examples,
        client: Any = None,
    ) -> None:
        self.model = RankModel(module, optimizer, criterion, examples.to(config.device), config)

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        examples = self.model.examples
        set_epoch(examples, epoch)
        order = torch.from_numpy(
            epoch_permutation(self.model.config.seed, epoch, len(examples))
        ).to(examples.device)
        run_updates(self.model, damper, state, order, 0, Reducer(), on_update)

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            close(model.examples)
