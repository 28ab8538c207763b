"""The decentralized engine: an all-reduce among Dask workers, no parameter server.

Each worker runs one long task per *segment*: a run of updates at one worker
count. Every rank holds the same weights, optimizer state and damper; per
update it sums gradients over its slice of the batch, one
``all_reduce`` adds the sums (and the loss and gradient statistics riding in
the same buffer), and every rank takes the same optimizer step. Since all
ranks see identical reduced statistics, their dampers agree on every batch
size without asking the client. When the damper's batch size calls for
another worker count, or the epoch ends, rank 0 returns the state, the client
rescales the cluster, and a new process group starts from that state.
"""
from __future__ import annotations

import copy
import datetime
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from distributed import wait
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from ..dampers import BaseDamper, TrainState
from ..exceptions import ConvergenceError
from ..scaling import available_workers, workers_for
from ..schedule import advance, epoch_permutation, next_update
from . import _step, _worker
from ._dask import DaskEngine, host_of
from .base import OnUpdate, UpdateRecord

logger = logging.getLogger(__name__)

# A rank whose peer died fails its all-reduce after this long at most.
GROUP_TIMEOUT = datetime.timedelta(seconds=60)
# Segment restarts after lost workers, before the fit gives up.
MAX_RESTARTS = 3
# Seconds between checks that a segment's workers are still alive.
LIVENESS_POLL_S = 1.0
# What a rank raises when a peer or its own worker goes away.
_LOST_WORKER_ERRORS = (dist.DistBackendError, KilledWorker, CommClosedError, OSError)


@dataclass
class SegmentStart:
    """Where a segment begins: identical on every rank."""

    epoch: int
    offset: int
    target_workers: int
    module_state: dict
    optimizer_state: dict
    damper: BaseDamper
    state: TrainState
    token: str


@dataclass
class SegmentResult:
    """What rank 0 hands back when a segment ends."""

    offset: int
    records: list[UpdateRecord]
    module_state: dict
    optimizer_state: dict
    damper: BaseDamper
    state: TrainState
    wanted_workers: int | None = None
    """Set when the segment stopped because the damper wants another worker count."""


def _process_group(host: str, port: int, rank: int, world: int, device: str):
    store = dist.TCPStore(host, port, world, rank == 0, timeout=GROUP_TIMEOUT)
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, GROUP_TIMEOUT)


def run_segment(payload: _worker.PayloadRef, start: SegmentStart, rank: int, world: int,
                host: str, port: int) -> SegmentResult | None:
    """Run updates on this rank until the epoch ends or the worker count must change."""
    model = _worker.worker_model(payload)
    config = model.config
    _worker.load_state(model, start.module_state, start.optimizer_state, start.token)
    module, optimizer = model.module, model.optimizer
    # ``start`` may be the very object Dask serves to the other ranks: never mutate it.
    damper, state = copy.deepcopy(start.damper), copy.deepcopy(start.state)
    device = model.X.device
    group = _process_group(host, port, rank, world, config.device) if world > 1 else None

    # Gradients live as views of one flat buffer, so backward writes straight
    # into what is all-reduced: one collective per update, no copies. Two
    # extra slots carry the loss sum and this rank's squared gradient norm.
    params = [p for p in module.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    flat = torch.zeros(sum(sizes) + 2, device=device)
    grads = flat[:-2]
    for p, view in zip(params, torch.split(grads, sizes)):
        p.grad = view.view_as(p)

    def all_reduce(tensor: torch.Tensor) -> None:
        if group is not None:
            group.allreduce([tensor]).wait()

    n = len(model.X)
    order = torch.from_numpy(epoch_permutation(config.seed, start.epoch, n)).to(device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    records: list[UpdateRecord] = []
    offset, wanted = start.offset, None
    module.train()
    while offset < n:
        began = time.perf_counter()
        if damper.needs_loss and damper.loss_due(state):
            state.train_loss = _sharded_loss(model, damper, state, rank, world, all_reduce)
        plan = next_update(damper, state, config.max_batch_size, offset)
        wanted_now = workers_for(plan.full_batch_size, config.grads_per_worker,
                                 config.min_workers, config.max_workers)
        if wanted_now != start.target_workers:
            wanted = wanted_now
            break
        lo, hi = _step.split_slices(plan.batch_size, world)[rank]
        idx = order[offset + lo : offset + hi]
        flat.zero_()
        if len(idx):
            flat[-2] = _step.accumulate_gradient_sum(
                module, model.criterion, model.X[idx], model.y[idx], config.worker_max_batch_size)
        if damper.needs_grad_stats and len(idx):
            flat[-1] = grads.double().pow(2).sum() / len(idx) ** 2
        all_reduce(flat)
        loss = float(flat[-2]) / plan.batch_size
        lr = base_lrs[0] * plan.lr_factor
        _step.check_finite(loss, state.model_updates + 1, plan.batch_size, lr)
        stats = {}
        if damper.needs_grad_stats:
            mean_sq = float(grads.double().pow(2).sum()) / plan.batch_size**2
            stats = _step.gradient_stats(mean_sq, float(flat[-1]), world, plan.batch_size)
        _step.apply_update(module, optimizer, base_lrs, plan.lr_factor, plan.batch_size)
        advance(state, plan.batch_size)
        state.last_loss, state.grad_stats = loss, stats
        offset += plan.batch_size
        if rank == 0:
            records.append(UpdateRecord(plan.damping, plan.batch_size, lr, world, loss,
                                        time.perf_counter() - began, stats))
    for group_, base in zip(optimizer.param_groups, base_lrs):
        group_["lr"] = base
    for p in params:  # detach the views so later loads start clean
        p.grad = None
    if rank != 0:
        model.state_token = None
        return None
    module_state, optimizer_state = _worker.export_state(model)
    model.state_token = None
    return SegmentResult(offset, records, module_state, optimizer_state, damper, state, wanted)


def _sharded_loss(model: _worker.WorkerModel, damper: BaseDamper, state: TrainState,
                  rank: int, world: int, all_reduce) -> float:
    """The damper's training loss: each rank evaluates a share, one all-reduce sums them."""
    fraction = getattr(damper, "loss_fraction", 1.0)
    idx = _step.loss_indices(model.config.seed, state.model_updates, len(model.X), fraction)
    lo, hi = _step.split_slices(len(idx), world)[rank]
    mine = torch.from_numpy(idx[lo:hi]).to(model.X.device)
    chunk = model.config.worker_max_batch_size or _step.EVAL_CHUNK
    total = torch.zeros(1, dtype=torch.float64, device=model.X.device)
    if len(mine):
        total[0] = _step.loss_sum(model.module, model.criterion, model.X[mine], model.y[mine], chunk)
    all_reduce(total)
    return float(total[0]) / len(idx)


class DecentralizedEngine(DaskEngine):
    """All-reduce among Dask workers; one task per worker per segment."""

    name = "decentralized"

    def run_epoch(self, epoch: int, damper: BaseDamper, state: TrainState,
                  on_update: OnUpdate) -> None:
        module_state, optimizer_state = self.client_state()
        offset, target, restarts = 0, self.guess_workers(damper, state, 0), 0
        while offset < self.n_examples:
            world = self.scale_to(target)
            start = SegmentStart(epoch, offset, target, module_state, optimizer_state,
                                 damper, state, token=f"{self.fit_id}-{epoch}-{offset}-{restarts}")
            try:
                result = self._run_segment(start, world)
            except _LostWorkers as lost:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise RuntimeError(
                        f"Dask workers kept failing during epoch {epoch} ({restarts} restarts); "
                        f"last error: {lost.cause!r}") from lost.cause
                logger.warning("A worker was lost (%r); restarting the segment on the workers left.",
                               lost.cause)
                self.scaler.reset()
                continue
            for record in result.records:
                on_update(record)
            module_state, optimizer_state = result.module_state, result.optimizer_state
            damper.load_state_dict(result.damper.state_dict())
            vars(state).update(vars(result.state))
            offset = result.offset
            if result.wanted_workers is not None:
                target = result.wanted_workers
        self.adopt_state(module_state, optimizer_state)

    def _run_segment(self, start: SegmentStart, world: int) -> SegmentResult:
        workers = self.scaler.workers()[:world]
        if not workers:
            raise RuntimeError("The Dask cluster has no workers left to train on.")
        world = len(workers)
        payload = self.ensure_payload()
        port = self.client.submit(_worker.free_port, workers=[workers[0]], pure=False).result()
        # One copy of the starting state goes to the cluster; ranks fetch it from there.
        start_future = self.hold(start)
        futures = [
            self.client.submit(
                run_segment, payload, start_future, rank, world, host_of(workers[0]), port,
                workers=[address], allow_other_workers=False,
                pure=False, key=f"adadamp-segment-{start.token}-{rank}")
            for rank, address in enumerate(workers)
        ]
        try:
            self._wait_for_segment(futures, workers)
            return futures[0].result()
        finally:
            self.client.cancel(futures + [start_future])

    def _wait_for_segment(self, futures, workers: list[str]) -> None:
        """Wait for all ranks; a failed rank or a vanished worker ends the wait."""
        pending, misses = list(futures), 0
        while pending:
            try:
                # distributed.wait waits with the default client; the fit's client
                # may not be it (an embedded cluster's never is): make it current.
                with self.client.as_current():
                    wait(pending, timeout=LIVENESS_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                # A rank whose worker died is rescheduled nowhere (it is pinned):
                # notice the worker's absence instead of waiting forever. Two
                # polls in a row, so one slow answer from a busy scheduler
                # does not restart a healthy segment.
                gone = set(workers) - set(available_workers(self.client))
                misses = misses + 1 if gone else 0
                if misses >= 2:
                    raise _LostWorkers(RuntimeError(f"worker(s) {sorted(gone)} left the cluster"))
                continue
            failed = [f for f in futures if f.status == "error"]
            if failed:
                error = failed[0].exception()
                gone = set(workers) - set(available_workers(self.client))
                if gone or isinstance(error, _LOST_WORKER_ERRORS):
                    raise _LostWorkers(error)
                raise error
            pending = [f for f in futures if not f.done()]


class _LostWorkers(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
