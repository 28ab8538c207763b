"""The decentralized engine: an all-reduce among Dask workers, no parameter server.

A *segment* is the run of updates at one worker count, across as many
epochs as that count lasts. Every rank holds the same
weights, optimizer state and damper; per update it sums gradients over its
slice of the batch, one ``all_reduce`` adds the sums (and the loss and
gradient statistics riding in the same buffer), and every rank takes the
same optimizer step. Since all ranks see identical reduced statistics, their
dampers agree on every batch size without asking the client.

Each rank runs one task per epoch, and the process group, module, optimizer
and damper live on in the worker between them, as long as the group's
membership stays. The epoch's end is one short hand-off: rank 0's task
returns the epoch's records and state, the client runs validation,
callbacks and checkpoints on it, and the next epoch's tasks carry only the
optimizer settings (a skorch callback may have changed the learning rate)
and, if a callback changed them, the weights. When the damper's batch size
calls for another worker count (see :class:`~adadamp.scaling.WorkerCountRule`),
or a worker is lost, rank 0 returns the state at that update, and a new
group starts from it on the new workers. A group starts on the workers
that already hold the fit's model (:mod:`._warm`); while it is short of
workers, the client asks rank 0 to stop it as soon as more are
ready, and every rank stops at the same update (the vote rides in the
reduced buffer).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from distributed import wait
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from ..dampers import BaseDamper
from ..examples import set_epoch
from ..scaling import WorkerCountRule, available_workers
from ..schedule import epoch_permutation
from ..state import TrainState
from . import _worker
from ._dask import DaskEngine
from ._loop import Reducer, run_updates
from .base import OnUpdate, UpdateRecord

logger = logging.getLogger(__name__)

# A rank whose peer died mid-update fails its all-reduce after this long at most.
GROUP_TIMEOUT = datetime.timedelta(seconds=60)
# Ranks meet at the store within this long, or the segment is given up and
# restarted: a few liveness polls, so a rank whose peer died before meeting
# frees its worker's only thread quickly.
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=10)
# Segment restarts after lost workers, before the fit gives up.
MAX_RESTARTS = 3
# Seconds between checks that a segment's workers are still alive.
LIVENESS_POLL_S = 1.0
# What a rank raises when a peer or its own worker goes away.
_LOST_WORKER_ERRORS = (dist.DistError, KilledWorker, CommClosedError, OSError)


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
    immediate: bool
    """Whether the worker count follows the damper at once (a planned schedule)."""
    rendezvous: tuple[str, int]
    """Host and port of rank 0's store (unused with one rank)."""


@dataclass
class GoOn:
    """The client's word to every rank of a running segment: train the next epoch."""

    token: str
    epoch: int
    hyperparameters: list[dict] = field(default_factory=list)
    """Each optimizer param group's settings (``lr``, ...) as the client has them."""
    module_state: dict | None = None
    """The client's weights, when its callbacks changed them since the last epoch."""


@dataclass
class Handoff:
    """What rank 0 returns at the end of an epoch, or where its segment stops."""

    offset: int
    records: list[UpdateRecord]
    module_state: dict
    optimizer_state: dict
    damper: BaseDamper
    state: TrainState
    wanted_workers: int | None = None
    """Set when the segment stops because the damper wants another worker count."""


class GroupReducer(Reducer):
    """Sums over the ranks of a segment's process group."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.group is not None:
            self.group.allreduce([tensor]).wait()


@dataclass
class RankSegment:
    """What a rank keeps between the epochs of its segment."""

    token: str
    reducer: GroupReducer
    damper: BaseDamper
    state: TrainState
    rule: WorkerCountRule
    listener: socket.socket | None = None
    """Rank 0's store socket, open while the group lives."""


# fit id -> this worker's running segment of that fit (one at a time).
_SEGMENTS: dict[str, RankSegment] = {}
# Tokens of segments the client asked to stop (set on rank 0's worker by request_stop).
_STOP_REQUESTS: set[str] = set()


def request_stop(token: str) -> None:
    """Ask the segment ``token`` to stop after its current update (run on rank 0's worker).

    Rank 0 votes in its next reduction, so every rank stops at the same
    update and hands off as for a rescale.
    """
    _STOP_REQUESTS.add(token)


def _process_group(
    start: SegmentStart, rank: int, world: int, device: str
) -> tuple[Any, socket.socket | None]:
    """The segment's group, and (rank 0) the listening socket its store serves on.

    The socket is the one :func:`~._worker.open_rendezvous` bound; it must stay
    open as long as the store uses it, so the caller keeps it with the group.
    """
    host, port = start.rendezvous
    listener = _worker.take_rendezvous(start.token) if rank == 0 else None
    store = dist.TCPStore(
        host,
        port,
        world,
        rank == 0,
        timeout=RENDEZVOUS_TIMEOUT,
        master_listen_fd=listener.fileno() if listener is not None else None,
    )
    if device.startswith("cuda"):
        group: Any = dist.ProcessGroupNCCL(store, rank, world, dist.ProcessGroupNCCL.Options())
    else:
        group = dist.ProcessGroupGloo(store, rank, world, GROUP_TIMEOUT)
    return group, listener


def _join(
    model: _worker.WorkerModel, fit_id: str, start: SegmentStart, rank: int, world: int
) -> RankSegment:
    _worker.load_state(model, start.module_state, start.optimizer_state, start.token)
    _SEGMENTS.pop(fit_id, None)  # a segment this worker was in before has ended
    group, listener = (
        _process_group(start, rank, world, model.config.device) if world > 1 else (None, None)
    )
    # ``start`` may be the very object Dask serves to the other ranks: never mutate it.
    segment = RankSegment(
        start.token,
        GroupReducer(group, rank, world),
        copy.deepcopy(start.damper),
        copy.deepcopy(start.state),
        WorkerCountRule(start.target_workers, immediate=start.immediate),
        listener,
    )
    _SEGMENTS[fit_id] = segment
    return segment


def run_epoch_part(
    payload: _worker.PayloadRef, order: SegmentStart | GoOn, rank: int, world: int
) -> Handoff | None:
    """Run this rank's updates until the epoch ends or the worker count must change.

    ``order`` starts a segment (a new group, the state to start from) or
    continues the running one into its next epoch.
    """
    model = _worker.worker_model(payload)
    config = model.config
    if isinstance(order, SegmentStart):
        segment = _join(model, payload.fit_id, order, rank, world)
        epoch, offset = order.epoch, order.offset
    else:
        segment = _SEGMENTS[payload.fit_id]
        if segment.token != order.token:
            raise RuntimeError(f"segment {order.token} is not running on this worker")
        for group, settings in zip(model.optimizer.param_groups, order.hyperparameters):
            group.update(settings)
        if order.module_state is not None:
            model.module.load_state_dict(order.module_state)
        epoch, offset = order.epoch, 0
    permutation = epoch_permutation(config.seed, epoch, len(model.examples))
    set_epoch(model.examples, epoch)
    records: list[UpdateRecord] = []
    offset, stopped_at = run_updates(
        model,
        segment.damper,
        segment.state,
        torch.from_numpy(permutation).to(model.examples.device),
        offset,
        segment.reducer,
        records.append if rank == 0 else (lambda record: None),
        keep_going=lambda plan: not segment.rule.changes(config.workers_for(plan.full_batch_size)),
        stop_vote=(lambda: segment.token in _STOP_REQUESTS) if rank == 0 else None,
    )
    wanted = None if stopped_at is None else config.workers_for(stopped_at.full_batch_size)
    if wanted is not None:
        _SEGMENTS.pop(payload.fit_id, None)
        _STOP_REQUESTS.discard(segment.token)
    if rank != 0:
        return None
    module_state, optimizer_state = _worker.export_state(model)
    return Handoff(
        offset, records, module_state, optimizer_state, segment.damper, segment.state, wanted
    )


def warm_rank(ref: _worker.PayloadRef) -> None:
    """Build a worker's model for a fit before its first segment.

    A task of this module, so that the worker also imports what a rank runs
    (``torch.distributed`` takes seconds to import on a busy machine).
    """
    _worker.warm(ref)


async def release_segment(fit_id: str) -> None:
    """Forget this worker's segment of a fit (its group goes with it).

    A coroutine, so that ``client.run`` need not wait for a busy worker.
    """
    _SEGMENTS.pop(fit_id, None)
    _STOP_REQUESTS.difference_update({t for t in _STOP_REQUESTS if t.startswith(fit_id)})


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


class DecentralizedEngine(DaskEngine):
    """All-reduce among Dask workers; per epoch one task per worker, groups that persist."""

    name = "decentralized"
    warm_up = staticmethod(warm_rank)

    def __init__(self) -> None:
        super().__init__()
        # (token, workers, target count) of the running segment
        self._running: tuple[str, list[str], int] | None = None
        self._held: dict | None = None  # the weights the client last adopted

    def start(self, *args, **kwargs) -> None:
        self._running, self._held = None, None
        super().start(*args, **kwargs)

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        module_state, optimizer_state = self.client_state()
        offset, restarts, target = 0, 0, None
        self.plan_ahead(damper, state, 0)
        if self._running is not None and self._more_ready():
            # The segment runs on fewer workers than it wants, and more are
            # ready now: start over on them.
            target = self._running[2]
            self.note_rescale(state.model_updates, len(self._running[1]), target)
            self._running = None
        while True:
            if self._running is None:
                if target is None:
                    target = self.guess_workers(damper, state, offset)
                order: SegmentStart | GoOn = self._segment_start(
                    epoch,
                    offset,
                    target,
                    module_state,
                    optimizer_state,
                    damper,
                    state,
                    token=f"{self.fit_id}-{epoch}-{offset}-{restarts}",
                )
            else:
                order = GoOn(
                    self._running[0],
                    epoch,
                    _hyperparameters(self.optimizer),
                    self._changed_weights(module_state),
                )
            try:
                handoff = self._run_part(order)
            except _LostWorkers as lost:
                restarts += 1
                self._running = None
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
            except BaseException:
                self._running = None
                raise
            for record in handoff.records:
                on_update(record)
            self.note_progress(handoff.records)
            self.note_resumed(sum(r.duration for r in handoff.records))
            module_state, optimizer_state = handoff.module_state, handoff.optimizer_state
            damper.load_state_dict(handoff.damper.state_dict())
            state.load_state_dict(handoff.state.state_dict())
            offset = handoff.offset
            if handoff.wanted_workers is None:
                break
            assert self._running is not None
            self.note_rescale(state.model_updates, len(self._running[1]), handoff.wanted_workers)
            self._running, target = None, handoff.wanted_workers
            self.plan_ahead(damper, state, offset)
        self.adopt_state(module_state, optimizer_state)
        self._held = module_state
        self.epochs_run += 1

    def _changed_weights(self, module_state: dict) -> dict | None:
        """The client's weights if a callback changed them since the last epoch, else None."""
        held = self._held
        if (
            held is not None
            and held.keys() == module_state.keys()
            and all(torch.equal(held[k], v) for k, v in module_state.items())
        ):
            return None
        return module_state

    def _segment_start(
        self,
        epoch: int,
        offset: int,
        target: int,
        module_state: dict,
        optimizer_state: dict,
        damper: BaseDamper,
        state: TrainState,
        token: str,
    ) -> SegmentStart:
        workers = self._segment_workers(target)
        if not workers:
            raise RuntimeError("The Dask cluster has no workers left to train on.")
        self.settle_rescale(len(workers))
        rendezvous = ("", 0)
        if len(workers) > 1:
            rendezvous = self.client.submit(
                _worker.open_rendezvous, token, workers=[workers[0]], pure=False
            ).result()
        self._running = (token, workers, target)
        return SegmentStart(
            epoch,
            offset,
            target,
            module_state,
            optimizer_state,
            damper,
            state,
            token,
            immediate=not damper.adaptive,
            rendezvous=rendezvous,
        )

    def _segment_workers(self, target: int) -> list[str]:
        """The workers of a new segment that wants ``target`` of them.

        Training does not wait for workers to start: when fewer than
        ``target`` hold the fit's model, the cluster is asked for ``target``
        and the segment starts on those that do. It runs short until more are
        ready, and is then stopped and restarted on them (:meth:`_wait_for_ranks`).
        Only with no worker ready at all (a cluster without workers yet) is
        the cluster scaled and waited for. Otherwise it is scaled to
        ``target`` (shrunk, as far as it may be) and the ready workers come first.
        """
        ready = self.ready_workers()
        if ready and target > len(ready):
            self.scaler.request(target)
            self.scaler.running_on(len(ready))
            return ready
        world = self.scale_to(target)
        ready = self.ready_workers()  # again: shrinking may have retired some
        others = [w for w in self.scaler.workers() if w not in ready]
        return (ready + others)[:world]

    def _more_ready(self) -> bool:
        """Whether the running segment is short of workers and more are ready to join it."""
        if self._running is None:
            return False
        _, workers, target = self._running
        return len(workers) < target and len(self.ready_workers()) > len(workers)

    def _run_part(self, order: SegmentStart | GoOn) -> Handoff:
        assert self._running is not None
        token, workers, _ = self._running
        payload = self.ensure_payload()
        # A segment's starting state goes to the cluster once; ranks fetch it from there.
        held = self.hold(order) if isinstance(order, SegmentStart) else order
        futures = [
            self.client.submit(
                run_epoch_part,
                payload,
                held,
                rank,
                len(workers),
                workers=[address],
                allow_other_workers=False,
                pure=False,
                key=f"adadamp-part-{token}-{order.epoch}-{rank}",
            )
            for rank, address in enumerate(workers)
        ]
        try:
            self._wait_for_ranks(futures, workers)
            handoff = futures[0].result()
            assert isinstance(handoff, Handoff)  # rank 0 always hands off
            return handoff
        finally:
            self.client.cancel(futures + ([held] if held is not order else []))

    def _wait_for_ranks(self, futures, workers: list[str]) -> None:
        """Wait for all ranks; a failed rank or a vanished worker ends the wait."""
        pending, misses, stop_asked = list(futures), 0, False
        while pending:
            try:
                # distributed.wait waits with the default client; the fit's client
                # may not be it (an embedded cluster's never is): make it current.
                with self.client.as_current():
                    wait(pending, timeout=LIVENESS_POLL_S, return_when="FIRST_COMPLETED")
            except TimeoutError:
                if not stop_asked and self._more_ready():
                    # Workers this short segment wants are ready: stop it at
                    # the next update, to restart on them.
                    assert self._running is not None
                    self.client.run(request_stop, self._running[0], workers=[workers[0]])
                    stop_asked = True
                # A rank whose worker died is rescheduled nowhere (it is pinned):
                # notice the worker's absence instead of waiting forever. Two
                # polls in a row, so one slow answer from a busy scheduler
                # does not restart a healthy segment.
                gone = set(workers) - set(available_workers(self.client))
                misses = misses + 1 if gone else 0
                if misses >= 2:
                    raise _LostWorkers(
                        RuntimeError(f"worker(s) {sorted(gone)} left the cluster")
                    ) from None
                continue
            failed = [f for f in futures if f.status == "error"]
            if failed:
                error = failed[0].exception()
                gone = set(workers) - set(available_workers(self.client))
                if gone or isinstance(error, _LOST_WORKER_ERRORS):
                    raise _LostWorkers(error)
                raise error
            pending = [f for f in futures if not f.done()]

    def close(self) -> None:
        self._running, self._held = None, None
        if self.payload_future is not None:
            with contextlib.suppress(Exception):
                self.run_on_workers(release_segment, self.fit_id)
        super().close()


class _LostWorkers(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
