"""What both Dask engines do on the client: the cluster, its size, and the payload."""

from __future__ import annotations

import contextlib
import copy
import uuid
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..cluster import cluster_client
from ..dampers import BaseDamper
from ..examples import Examples
from ..scaling import WorkerScaler
from ..schedule import next_update
from ..state import TrainState
from . import _worker
from .base import Engine, TrainConfig


def _hold(value):
    return value


def host_of(address: str) -> str:
    """The host part of a Dask worker address such as ``tcp://10.0.0.5:4321``."""
    return urlparse(address).hostname or address


class DaskEngine(Engine):
    """Common client side of the centralized and decentralized engines.

    :meth:`start` opens the cluster (the given client, the current one, or an
    embedded ``LocalCluster`` that lives until :meth:`close`) and hands the
    fit's payload to the cluster once, in a task Dask can recompute; workers
    fetch it on their first task and keep it.
    """

    def __init__(self) -> None:
        self._exit = contextlib.ExitStack()
        self.payload_future = None

    def start(
        self,
        config: TrainConfig,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        examples: Examples,
        client: Any = None,
    ) -> None:
        # A new name per fit: workers cache a fit's model under it, and an
        # engine object may serve several fits.
        self.fit_id = uuid.uuid4().hex
        self.config = config
        self.module, self.optimizer = module, optimizer
        self.n_examples = len(examples)
        handle = self._exit.enter_context(
            cluster_client(
                client,
                n_workers_hint=config.min_workers,
                device=config.device,
                max_workers=config.max_workers,
            )
        )
        self.client = handle.client
        self.scaler = WorkerScaler(handle)
        self._payload = _worker.FitPayload(
            fit_id=self.fit_id,
            module=copy.deepcopy(module).cpu(),
            criterion=criterion,
            optimizer=_worker.OptimizerRecipe.of(optimizer, module),
            examples=examples.to("cpu"),
            config=config,
        )
        self.payload_future = None
        self.ensure_payload()

    def ensure_payload(self) -> _worker.PayloadRef:
        """The payload's handle (created on first use)."""
        if self.payload_future is None:
            self.payload_future = self.hold(self._payload)
            self.payload_ref = _worker.PayloadRef(self.fit_id, f"adadamp-payload-{self.fit_id}")
            self.client.publish_dataset(self.payload_future, name=self.payload_ref.name)
        return self.payload_ref

    def hold(self, value):
        """A future of ``value`` that the cluster can always rebuild.

        Scattered data has no lineage: when the workers holding it leave (the
        cluster shrinks, a worker dies), it is gone. A task that returns the
        value keeps it in its spec, so Dask recomputes it where it is needed.
        """
        return self.client.submit(_hold, value, pure=False)

    def scale_to(self, workers: int) -> int:
        """Give the cluster ``workers`` workers, as far as it can."""
        return self.scaler.scale_to(workers)

    def guess_workers(self, damper: BaseDamper, state: TrainState, offset: int) -> int:
        """The worker count the next update will want, without touching the damper.

        Dampers that need the training loss cannot be asked before it is
        computed: they keep the current count, and the workers correct it.
        """
        if damper.needs_loss:
            return self.scaler.n_workers or self.config.min_workers
        plan = next_update(
            copy.deepcopy(damper), copy.deepcopy(state), self.config.max_batch_size, offset
        )
        return self.config.workers_for(plan.full_batch_size)

    def client_state(self) -> tuple[dict, dict]:
        """The client module's and optimizer's state, to start workers from."""
        module_state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return module_state, self.optimizer.state_dict()

    def adopt_state(self, module_state: dict, optimizer_state: dict) -> None:
        """Make the client's module and optimizer hold the workers' result.

        The workers' param groups carry the last *scaled* learning rate; the
        client keeps its base rates (skorch callbacks may schedule them).
        """
        base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.module.load_state_dict(module_state)
        self.optimizer.load_state_dict(optimizer_state)
        for group, lr in zip(self.optimizer.param_groups, base_lrs):
            group["lr"] = lr

    def close(self) -> None:
        try:
            if self.payload_future is not None:
                with contextlib.suppress(Exception):
                    self.client.run(_worker.release, self.fit_id)
                with contextlib.suppress(Exception):
                    self.client.unpublish_dataset(self.payload_ref.name)
                self.payload_future.release()
                self.payload_future = None
        finally:
            self._exit.close()
