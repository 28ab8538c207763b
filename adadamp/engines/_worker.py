"""What runs inside Dask worker processes, for both Dask engines.

A fit ships one :class:`FitPayload` (module, criterion, optimizer recipe and
the training tensors) to the cluster once. Dask keeps the deserialised
payload in each worker's memory, so every later task on that worker receives
the same object without another transfer; :func:`worker_model` builds the
worker's module and optimizer from it once and caches them per fit. Per
update, only weights, gradients and indices travel, as tensors.
"""
from __future__ import annotations

import copy
import os
import socket
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .base import TrainConfig


@dataclass
class OptimizerRecipe:
    """How to rebuild an optimizer over another copy of the same module."""

    cls: type
    groups: list[dict]
    """Each group's hyper-parameters, with ``params`` as indices into ``module.parameters()``."""

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, module: nn.Module) -> OptimizerRecipe:
        index = {id(p): i for i, p in enumerate(module.parameters())}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        return cls(type(optimizer), groups)

    def build(self, module: nn.Module) -> torch.optim.Optimizer:
        params = list(module.parameters())
        groups = [{**g, "params": [params[i] for i in g["params"]]} for g in self.groups]
        return self.cls(groups)


@dataclass
class FitPayload:
    """Everything a worker needs for a fit, sent once per worker."""

    fit_id: str
    module: nn.Module
    criterion: nn.Module
    optimizer: OptimizerRecipe
    X: torch.Tensor
    y: torch.Tensor
    config: TrainConfig


@dataclass
class WorkerModel:
    """A worker's own module, optimizer and data for one fit."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    config: TrainConfig
    state_token: object = None
    """Identifies the weights and optimizer state the module holds now."""


_MODELS: dict[str, tuple[int, WorkerModel]] = {}
# fit id -> identities of the payload objects that arrived on this worker:
# one per transfer, which lets tests count how often the data was sent.
_ARRIVALS: dict[str, set[int]] = defaultdict(set)


def worker_model(payload: FitPayload) -> WorkerModel:
    """This worker's model for ``payload``'s fit, built on the payload's first use."""
    cached = _MODELS.get(payload.fit_id)
    if cached is not None and cached[0] == id(payload):
        return cached[1]
    _ARRIVALS[payload.fit_id].add(id(payload))
    device = torch.device(payload.config.device)
    # The payload object stays in Dask's memory; the worker trains its own copy.
    module = copy.deepcopy(payload.module).to(device)
    model = WorkerModel(
        module=module,
        optimizer=payload.optimizer.build(module),
        criterion=copy.deepcopy(payload.criterion).to(device),
        X=payload.X.to(device),
        y=payload.y.to(device),
        config=payload.config,
    )
    _MODELS[payload.fit_id] = (id(payload), model)
    return model


def load_state(model: WorkerModel, module_state: dict, optimizer_state: dict | None, token) -> None:
    """Make the worker's module (and optimizer) hold a given state, unless it already does."""
    if model.state_token is not None and model.state_token == token:
        return
    model.module.load_state_dict(module_state)
    if optimizer_state is not None:
        model.optimizer.load_state_dict(optimizer_state)
    model.state_token = token


def export_state(model: WorkerModel) -> tuple[dict, dict]:
    """Copies of the module's and optimizer's state, safe to keep while training goes on."""
    module_state = {k: v.detach().to("cpu", copy=True) for k, v in model.module.state_dict().items()}
    optimizer_state = copy.deepcopy(model.optimizer.state_dict())
    return module_state, optimizer_state


def set_threads_for(workers_on_host: int) -> None:
    """Share this machine's cores among the workers that run on it.

    PyTorch starts one compute thread per core in every process; with several
    workers on one machine that oversubscribes the cores.
    """
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, workers_on_host)))


def free_port() -> int:
    """A TCP port free on this worker's machine right now (for a process group)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def data_arrivals(fit_id: str) -> int:
    """How many times a fit's payload has arrived on this worker."""
    return len(_ARRIVALS.get(fit_id, ()))


def release(fit_id: str) -> None:
    """Forget a finished fit's module and data."""
    _MODELS.pop(fit_id, None)
