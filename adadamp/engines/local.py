"""The in-process engine: no Dask, one worker. The reference the others must match."""
from __future__ import annotations

import time

import torch
from torch import nn

from ..dampers import BaseDamper, TrainState
from ..schedule import advance, epoch_permutation, next_update
from . import _step
from .base import Engine, OnUpdate, UpdateRecord



class LocalEngine(Engine):
    """Computes every update in this process, on the estimator's own module."""

    name = "local"

    def start(self, module: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
              X: torch.Tensor, y: torch.Tensor) -> None:
        self.module, self.optimizer, self.criterion = module, optimizer, criterion
        self.X = X.to(self.config.device)
        self.y = y.to(self.config.device)

    def training_loss(self, damper: BaseDamper, state: TrainState) -> float:
        fraction = getattr(damper, "loss_fraction", 1.0)
        idx = torch.from_numpy(
            _step.loss_indices(self.config.seed, state.model_updates, len(self.X), fraction)
        ).to(self.X.device)
        chunk = self.config.worker_max_batch_size or _step.EVAL_CHUNK
        return _step.loss_sum(self.module, self.criterion, self.X[idx], self.y[idx], chunk) / len(idx)

    def run_epoch(self, epoch: int, damper: BaseDamper, state: TrainState,
                  on_update: OnUpdate) -> None:
        config, module, optimizer = self.config, self.module, self.optimizer
        n = len(self.X)
        order = torch.from_numpy(epoch_permutation(config.seed, epoch, n)).to(self.X.device)
        # Learning rates set per update are restored at the end of the epoch,
        # so that skorch callbacks that schedule the base rate keep working.
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        module.train()
        try:
            start = 0
            while start < n:
                began = time.perf_counter()
                if damper.needs_loss and damper.loss_due(state):
                    state.train_loss = self.training_loss(damper, state)
                plan = next_update(damper, state, config.max_batch_size, start)
                idx = order[start : start + plan.batch_size]
                optimizer.zero_grad(set_to_none=True)
                total_loss = _step.accumulate_gradient_sum(
                    module, self.criterion, self.X[idx], self.y[idx], config.worker_max_batch_size
                )
                loss = total_loss / plan.batch_size
                lr = base_lrs[0] * plan.lr_factor
                _step.check_finite(loss, state.model_updates + 1, plan.batch_size, lr)
                stats = {}
                if damper.needs_grad_stats:
                    sq = _step.squared_norm(_step.gradient_tensors(module)) / plan.batch_size**2
                    stats = _step.gradient_stats(sq, sq, 1, plan.batch_size)
                _step.apply_update(module, optimizer, base_lrs, plan.lr_factor, plan.batch_size)
                advance(state, plan.batch_size)
                state.last_loss, state.grad_stats = loss, stats
                on_update(UpdateRecord(plan.damping, plan.batch_size, lr, 1, loss,
                                       time.perf_counter() - began, stats))
                start += plan.batch_size
        finally:
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base
