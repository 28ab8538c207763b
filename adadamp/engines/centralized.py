"""The centralized engine: the paper's synchronous parameter server on Dask.

Per model update, ``P`` gradient tasks compute their slice's share of the
batch's mean gradient on the current weights, and one update task (the
parameter server) adds them and takes the optimizer step. The weights reach
the gradient tasks as a Dask future of tensors, so they travel worker to
worker without passing through the client; the training set travels once per
worker per fit (see :mod:`._worker`).

The server's state (weights and optimizer state) is a value returned by one
update task and consumed by the next, rooted in a task that holds the
epoch's starting state, so a lost worker costs only a recomputation that Dask
does from the task lineage. For dampers that do not
look at the model, the client submits a whole run of updates without waiting
for any of them; adaptive dampers read each update's loss first.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass

import torch

from .. import gns
from .._wire import TensorsApart
from ..dampers import BaseDamper
from ..examples import set_epoch
from ..scaling import WorkerCountRule
from ..schedule import UpdatePlan, advance, epoch_permutation, next_update
from ..state import TrainState
from . import _step, _worker
from ._dask import DaskEngine
from ._loop import chunk_loss, loss_chunks, rank_gradient, step
from .base import OnUpdate, UpdateRecord


@dataclass
class ServerState(TensorsApart):
    module_state: dict
    optimizer_state: dict
    token: str


@dataclass
class Weights(TensorsApart):
    """What gradient tasks need of the server's state: the module's, tagged."""

    module_state: dict
    token: str


def weights_of(server: ServerState) -> Weights:
    return Weights(server.module_state, server.token)


@dataclass
class UpdateInfo:
    loss: float
    grad_stats: dict
    finished: float
    """Wall-clock time (``time.time()``) the update task finished."""


def gradient_task(
    payload: _worker.PayloadRef,
    weights: Weights,
    indices: torch.Tensor,
    batch_size: int,
    with_pieces: bool,
    epoch: int,
    alone: bool = False,
) -> tuple[list[torch.Tensor], float, float, int]:
    """``indices``' share of a ``batch_size`` batch's mean gradient at ``weights``.

    Returns ``(grads, loss sum, sum_i |s_i|^2 / b_i, pieces)``: the last two
    are the per-piece norms of the gradient statistics (zeros without
    ``with_pieces``), see :class:`~._step.PieceNorms`.
    """
    model = _worker.worker_model(payload)
    set_epoch(model.examples, epoch)
    _worker.load_state(model, weights.module_state, None, weights.token)
    model.module.train()
    model.optimizer.zero_grad(set_to_none=True)
    norms = None
    if with_pieces and len(indices):
        norms = _step.PieceNorms(
            lambda: _step.gradient_tensors(model.module.parameters()), batch_size
        )
    loss = rank_gradient(
        model, indices.to(model.examples.device), batch_size, norms=norms, alone=alone
    )
    grads = [g.detach().cpu() for g in _step.gradient_tensors(model.module.parameters())]
    piece_sq, pieces = norms.result() if norms is not None else (0.0, 0)
    return grads, loss, piece_sq, pieces


def update_task(
    payload: _worker.PayloadRef,
    server: ServerState,
    plan: UpdatePlan,
    update: int,
    base_lrs: list[float],
    needs_stats: bool,
    *results,
) -> tuple[ServerState, Weights, UpdateInfo]:
    """The parameter server's step: add the workers' shares of the mean gradient, step."""
    model = _worker.worker_model(payload)
    _worker.load_state(model, server.module_state, server.optimizer_state, server.token)
    for i, p in enumerate(model.module.parameters()):
        p.grad = sum(r[0][i] for r in results).to(p.device)
    loss, _, stats = step(
        model,
        plan,
        update,
        sum(r[1] for r in results),
        sum(r[2] for r in results),
        sum(r[3] for r in results),
        base_lrs,
        needs_stats,
    )
    module_state, optimizer_state = _worker.export_state(model)
    new = ServerState(module_state, optimizer_state, token=f"{server.token}+{update}")
    model.state_token = (new.token, True)  # the worker now holds exactly this state
    return new, weights_of(new), UpdateInfo(loss, stats, time.time())


def loss_task(
    payload: _worker.PayloadRef, weights: Weights, chunks: list, epoch: int
) -> list[float]:
    """The summed loss of each chunk, at ``weights``, read as in ``epoch``."""
    model = _worker.worker_model(payload)
    set_epoch(model.examples, epoch)
    _worker.load_state(model, weights.module_state, None, weights.token)
    return [chunk_loss(model, chunk) for chunk in chunks]


class CentralizedEngine(DaskEngine):
    """A parameter server on Dask futures: ``P`` gradient tasks and one update task per update."""

    name = "centralized"

    def __init__(self) -> None:
        super().__init__()
        self._rule: WorkerCountRule | None = None  # the worker count in use, and when it moves

    def start(self, *args, **kwargs) -> None:
        self._rule = None
        super().start(*args, **kwargs)

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        client, config = self.client, self.config
        n = self.n_examples
        order = torch.from_numpy(epoch_permutation(config.seed, epoch, n))
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        payload = self.ensure_payload()
        module_state, optimizer_state = self.client_state()
        server = self.hold(ServerState(module_state, optimizer_state, f"{self.fit_id}-{epoch}"))
        weights = client.submit(weights_of, server, pure=False)
        # (plan, workers, updates its statistics stand for, the update's info)
        pending: list[tuple[UpdatePlan, int, int, object]] = []
        epoch_began = time.time()
        needs_stats = config.needs_grad_stats(damper)
        last_finished = [epoch_began]

        def flush() -> None:
            """Wait for the submitted updates and record them in order."""
            infos = client.gather([info for *_, info in pending])
            for (plan, workers, span, _), info in zip(pending, infos):
                if needs_stats:
                    # Smoothed here, in update order, as the other engines do in the loop.
                    info.grad_stats = gns.smoothed(state.grad_stats, info.grad_stats, span)
                    state.grad_stats = info.grad_stats
                on_update(
                    UpdateRecord(
                        plan.damping,
                        plan.batch_size,
                        base_lrs[0] * plan.lr_factor,
                        workers,
                        info.loss,
                        info.finished - last_finished[0],
                        info.grad_stats,
                    )
                )
                last_finished[0] = info.finished
            if damper.adaptive and infos:
                state.last_loss = infos[-1].loss
            pending.clear()

        offset = 0
        self.plan_ahead(damper, state, 0)
        while offset < n:
            if damper.needs_loss and damper.loss_due(state):
                flush()
                state.train_loss = self._training_loss(damper, state, weights, epoch)
            plan = next_update(damper, state, config.max_batch_size, offset, config.lr_scaling)
            wanted = config.workers_for(plan.full_batch_size)
            if self._rule is None:
                self._rule = WorkerCountRule(self.scale_to(wanted), immediate=not damper.adaptive)
            elif self._rule.changes(wanted):
                flush()  # rescale between updates, never under running tasks
                self.note_rescale(state.model_updates, self._rule.current, wanted)
                self._rule = WorkerCountRule(self.scale_to(wanted), immediate=not damper.adaptive)
                self.note_resumed(0.0)  # the stall is the scaling itself
            workers = self.scaler.workers()[: self._rule.current]
            batch = order[offset : offset + plan.batch_size]
            span = 0
            if needs_stats:
                span = _step.stats_span(
                    config.worker_max_batch_size,
                    plan.batch_size,
                    len(workers) == 1,
                    state.model_updates + 1,
                )
            grads = [
                # clone: a slice is a view, and would pickle the whole permutation.
                client.submit(
                    gradient_task,
                    payload,
                    weights,
                    batch[lo:hi].clone(),
                    plan.batch_size,
                    span > 0,
                    epoch,
                    len(workers) == 1,
                    workers=[w],
                    allow_other_workers=True,
                    pure=False,
                )
                for w, (lo, hi) in zip(workers, _step.split_slices(plan.batch_size, len(workers)))
            ]
            result = client.submit(
                update_task,
                payload,
                server,
                plan,
                state.model_updates + 1,
                base_lrs,
                config.computes_stats(damper, span),
                *grads,
                workers=[workers[0]],
                allow_other_workers=True,
                pure=False,
            )
            server = client.submit(operator.itemgetter(0), result, pure=False)
            weights = client.submit(operator.itemgetter(1), result, pure=False)
            info = client.submit(operator.itemgetter(2), result, pure=False)
            pending.append((plan, len(workers), max(span, 1), info))
            advance(state, plan.batch_size, plan.progress)
            offset += plan.batch_size
            if config.plans_read_model(damper):
                flush()
        flush()
        final = server.result()
        self.adopt_state(final.module_state, final.optimizer_state)
        self.epochs_run += 1

    def _training_loss(self, damper: BaseDamper, state: TrainState, weights, epoch: int) -> float:
        workers = self.scaler.workers()
        chunks = loss_chunks(self.config, damper, state, self.n_examples)
        parts = [
            self.client.submit(
                loss_task,
                self.ensure_payload(),
                weights,
                chunks[lo:hi],
                epoch,
                workers=[w],
                allow_other_workers=True,
                pure=False,
            )
            for w, (lo, hi) in zip(workers, _step.split_slices(len(chunks), len(workers)))
        ]
        # Summed in chunk order, as every engine does.
        sums = [s for part in self.client.gather(parts) for s in part]
        return float(torch.tensor(sums, dtype=torch.float64).sum()) / sum(len(c) for c in chunks)
