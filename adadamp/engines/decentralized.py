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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from distributed import wait
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from ..dampers import BaseDamper
from ..scaling import available_workers
from ..schedule import epoch_permutation
from ..state import TrainState
from . import _worker
from ._dask import DaskEngine, host_of
from ._loop import Reducer, run_updates
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


class GroupReducer(Reducer):
    """Sums over the ranks of a segment's process group."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.group is not None:
            self.group.allreduce([tensor]).wait()


def run_segment(
    payload: _worker.PayloadRef, start: SegmentStart, rank: int, world: int, host: str, port: int
) -> SegmentResult | None:
    """Run updates on this rank until the epoch ends or the worker count must change."""
    model = _worker.worker_model(payload)
    config = model.config
    _worker.load_state(model, start.module_state, start.optimizer_state, start.token)
    # ``start`` may be the very object Dask serves to the other ranks: never mutate it.
    damper, state = copy.deepcopy(start.damper), copy.deepcopy(start.state)
    group = _process_group(host, port, rank, world, config.device) if world > 1 else None
    reducer = GroupReducer(group, rank, world)
    device = model.examples.device
    order = torch.from_numpy(epoch_permutation(config.seed, start.epoch, len(model.examples)))
    records: list[UpdateRecord] = []
    on_update = records.append if rank == 0 else (lambda record: None)
    offset, stopped_at = run_updates(
        model,
        damper,
        state,
        order.to(device),
        start.offset,
        reducer,
        on_update,
        keep_going=lambda plan: config.workers_for(plan.full_batch_size) == start.target_workers,
    )
    wanted = None if stopped_at is None else config.workers_for(stopped_at.full_batch_size)
    if rank != 0:
        model.state_token = None
        return None
    module_state, optimizer_state = _worker.export_state(model)
    model.state_token = None
    return SegmentResult(offset, records, module_state, optimizer_state, damper, state, wanted)


class DecentralizedEngine(DaskEngine):
    """All-reduce among Dask workers; one task per worker per segment."""

    name = "decentralized"

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        module_state, optimizer_state = self.client_state()
        offset, target, restarts = 0, self.guess_workers(damper, state, 0), 0
        while offset < self.n_examples:
            world = self.scale_to(target)
            start = SegmentStart(
                epoch,
                offset,
                target,
                module_state,
                optimizer_state,
                damper,
                state,
                token=f"{self.fit_id}-{epoch}-{offset}-{restarts}",
            )
            try:
                result = self._run_segment(start, world)
            except _LostWorkers as lost:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise RuntimeError(
                        f"Dask workers kept failing during epoch {epoch} ({restarts} restarts); "
                        f"last error: {lost.cause!r}"
                    ) from lost.cause
                logger.warning(
                    "A worker was lost (%r); restarting the segment on the workers left.",
                    lost.cause,
                )
                self.scaler.reset()
                continue
            for record in result.records:
                on_update(record)
            module_state, optimizer_state = result.module_state, result.optimizer_state
            damper.load_state_dict(result.damper.state_dict())
            state.load_state_dict(result.state.state_dict())
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
                run_segment,
                payload,
                start_future,
                rank,
                world,
                host_of(workers[0]),
                port,
                workers=[address],
                allow_other_workers=False,
                pure=False,
                key=f"adadamp-segment-{start.token}-{rank}",
            )
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
