"""The decentralized engine: an all-reduce among Dask workers, no parameter server.

A *segment* is the run of updates at one worker count, across as many
epochs as that count lasts. Every rank holds the same
weights, optimizer state and damper; per update it sums gradients over its
slice of the batch, one ``all_reduce`` adds the sums (and the loss and
gradient statistics riding in the same buffer), and every rank takes the
same optimizer step. Since all ranks see identical reduced statistics, their
dampers agree on every batch size without asking the client.

Each rank runs one task per segment, and its process group, module,
optimizer and damper live in it across epochs. An epoch's end does not stop
the ranks: rank 0 posts the epoch's records and state outside Dask's task
machinery (:mod:`._mailbox`), and the ranks run ahead into the next epoch
while the client runs validation, callbacks and checkpoints on that state.
The client's word on the next epoch carries the optimizer settings (a
skorch callback may have changed the learning rate) and, if a callback
changed them, the weights; when it changes nothing the ranks' head start
stands, otherwise they restore the epoch's start and run it again with the
change (see :func:`run_segment`). When the damper's batch size
calls for another worker count (see :class:`~adadamp.scaling.WorkerCountRule`),
or a worker is lost, rank 0 posts the state at that update, and a new
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from ..dampers import BaseDamper
from ..examples import set_epoch
from ..scaling import WorkerCountRule, available_workers
from ..schedule import UpdatePlan, epoch_permutation
from ..state import TrainState
from . import _mailbox, _worker
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
    module_state: dict | None
    """None: the workers' models hold the state the fit's payload built them with."""
    optimizer_state: dict | None
    damper: BaseDamper
    state: TrainState
    token: str
    immediate: bool
    """Whether the worker count follows the damper at once (a planned schedule)."""
    rendezvous: tuple[str, int]
    """Host and port of rank 0's store (unused with one rank)."""
    last_epoch: int | None = None
    """The fit's last planned epoch: the ranks do not run ahead past it."""


@dataclass
class GoOn:
    """The client's word to every rank of a running segment on its next epoch."""

    epoch: int
    hyperparameters: list[dict] = field(default_factory=list)
    """Each optimizer param group's settings (``lr``, ...) as the client has them."""
    module_state: dict | None = None
    """The client's weights, when its callbacks changed them since the last epoch."""


@dataclass
class Handoff:
    """What rank 0 posts at the end of an epoch, or where its segment stops."""

    epoch: int
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
    """What a rank's task keeps across the epochs of its segment."""

    token: str
    reducer: GroupReducer
    damper: BaseDamper
    state: TrainState
    rule: WorkerCountRule
    listener: socket.socket | None = None
    """Rank 0's store socket, open while the group lives."""
    records: list[UpdateRecord] = field(default_factory=list)
    """Rank 0: the updates of the epoch so far."""


# fit id -> this worker's running segment of that fit (one at a time; for tests to see).
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
    if start.module_state is not None:
        _worker.load_state(model, start.module_state, start.optimizer_state, start.token)
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


# What rank 0 votes to stop a run of updates for (summed over the ranks: only rank 0 votes).
_STOP_ASKED = 1  # the client asked for a stop (more workers are ready)
_WORD_CAME = 2  # the client's word on the epoch the ranks run ahead into has arrived


@dataclass
class EpochStart:
    """A rank's copy of its state where an epoch began.

    The ranks run ahead into an epoch while the client does its epoch-end
    work; if the client's word then changes anything, every rank goes back
    to this copy and runs the epoch again with the change.
    """

    module_state: dict
    optimizer_state: dict
    damper: BaseDamper
    state: TrainState
    rule: WorkerCountRule

    @classmethod
    def of(cls, model: _worker.WorkerModel, segment: RankSegment) -> EpochStart:
        module_state, optimizer_state = _worker.export_state(model)
        return cls(
            module_state,
            optimizer_state,
            copy.deepcopy(segment.damper),
            copy.deepcopy(segment.state),
            copy.deepcopy(segment.rule),
        )

    def restore(self, model: _worker.WorkerModel, segment: RankSegment) -> None:
        model.module.load_state_dict(self.module_state)
        model.optimizer.load_state_dict(self.optimizer_state)
        segment.damper = copy.deepcopy(self.damper)
        segment.state = copy.deepcopy(self.state)
        segment.rule = copy.deepcopy(self.rule)
        segment.records = []


def run_segment(payload: _worker.PayloadRef, start: SegmentStart, rank: int, world: int) -> None:
    """Run this rank's part of a segment: its epochs, until the worker count must change.

    One task per rank for the whole segment. At each epoch's end rank 0
    posts the epoch's :class:`Handoff` to the client (:mod:`._mailbox`), and
    the ranks run ahead into the next epoch without waiting for the client's
    word on it (:class:`GoOn`, or None to end). When the word arrives, rank
    0 votes, so every rank reads it after the same update: if it changes
    nothing (no callback touched the learning rate or the weights), the
    epoch goes on; otherwise every rank restores the epoch's start
    (:class:`EpochStart`) and runs it again with the change. When the damper
    wants another worker count, or the client asked for a stop, rank 0 posts
    the state at that update and the segment ends.
    """
    model = _worker.worker_model(payload)
    fit_id = payload.fit_id
    segment = _join(model, fit_id, start, rank, world)
    token, given_up = segment.token, _released_check(fit_id)
    epoch, offset = start.epoch, start.offset
    ahead: EpochStart | None = None  # set while the client's word on this epoch is awaited

    def vote() -> int:
        code = _STOP_ASKED if token in _STOP_REQUESTS else 0
        if ahead is not None and (_mailbox.has_word(token) or given_up()):
            code |= _WORD_CAME
        return code

    try:
        while True:
            offset, not_run, votes = _run_part(
                model, segment, epoch, offset, vote if rank == 0 else None
            )
            if ahead is not None:
                # Whatever stopped this part, the epoch stands only if the word says so.
                word, redone = _settle(model, segment, ahead, given_up)
                if word is None:
                    return
                ahead = None
                if redone:
                    epoch, offset = word.epoch, 0
                    continue
            if not_run is None:  # the epoch ended: hand it off and run ahead
                ahead = EpochStart.of(model, segment)
                if rank == 0:
                    _mailbox.post(token, _handoff(epoch, offset, segment, ahead))
                epoch, offset = epoch + 1, 0
                if start.last_epoch is not None and epoch > start.last_epoch:
                    # The fit plans no more epochs: wait for the word rather
                    # than read and compute an epoch that will not be used.
                    word, _ = _settle(model, segment, ahead, given_up)
                    if word is None:
                        return
                    epoch, ahead = word.epoch, None
            elif votes != _WORD_CAME:  # another worker count is wanted, or a stop asked
                if rank == 0:
                    wanted = model.config.workers_for(not_run.full_batch_size)
                    here = EpochStart.of(model, segment)
                    _mailbox.post(token, _handoff(epoch, offset, segment, here, wanted))
                return
    finally:
        if _SEGMENTS.get(fit_id) is segment:
            del _SEGMENTS[fit_id]
        _STOP_REQUESTS.discard(token)


def _settle(
    model: _worker.WorkerModel,
    segment: RankSegment,
    ahead: EpochStart,
    given_up: Callable[[], bool],
) -> tuple[GoOn | None, bool]:
    """Wait for the client's word on the epoch that began at ``ahead``.

    Returns the word (None: the segment ends) and whether it changed
    anything, in which case the rank is back at ``ahead`` with the change applied.
    """
    word = _mailbox.wait_word(segment.token, given_up)
    if word is None or not _changes(model, word):
        return word, False
    ahead.restore(model, segment)
    _apply(model, word)
    return word, True


def _handoff(
    epoch: int, offset: int, segment: RankSegment, at: EpochStart, wanted: int | None = None
) -> Handoff:
    """Rank 0's hand-off of the updates so far, with the state ``at`` their end."""
    records, segment.records = segment.records, []
    return Handoff(
        epoch, offset, records, at.module_state, at.optimizer_state, at.damper, at.state, wanted
    )


def _changes(model: _worker.WorkerModel, word: GoOn) -> bool:
    """Whether the client's word changes the weights or any optimizer setting."""
    if word.module_state is not None:
        return True
    now = _hyperparameters(model.optimizer)
    return len(now) != len(word.hyperparameters) or any(
        not _same_settings(a, b) for a, b in zip(now, word.hyperparameters)
    )


def _same_settings(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(other)):
                return False
        elif value != other:
            return False
    return True


def _apply(model: _worker.WorkerModel, word: GoOn) -> None:
    for group, settings in zip(model.optimizer.param_groups, word.hyperparameters):
        group.update(settings)
    if word.module_state is not None:
        model.module.load_state_dict(word.module_state)


def _run_part(
    model: _worker.WorkerModel,
    segment: RankSegment,
    epoch: int,
    offset: int,
    vote: Callable[[], int] | None,
) -> tuple[int, UpdatePlan | None, int]:
    """Run updates of ``epoch`` from ``offset``: :func:`~._loop.run_updates` on this rank.

    It stops at the epoch's end, when the worker count must change, or when rank 0 votes.
    """
    config = model.config
    permutation = epoch_permutation(config.seed, epoch, len(model.examples))
    set_epoch(model.examples, epoch)
    return run_updates(
        model,
        segment.damper,
        segment.state,
        torch.from_numpy(permutation).to(model.examples.device),
        offset,
        segment.reducer,
        segment.records.append if segment.reducer.rank == 0 else (lambda record: None),
        keep_going=lambda plan: not segment.rule.changes(config.workers_for(plan.full_batch_size)),
        stop_vote=vote,
    )


def _released_check(fit_id: str) -> Callable[[], bool]:
    """Whether the fit was released, or this task is no longer wanted (its client went away)."""
    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()

    def given_up() -> bool:
        task = worker.state.tasks.get(key)
        return fit_id in _worker._RELEASED or task is None or task.state == "cancelled"

    return given_up


def warm_rank(ref: _worker.PayloadRef) -> None:
    """Build a worker's model for a fit before its first segment.

    A task of this module, so that the worker also imports what a rank runs
    (``torch.distributed`` takes seconds to import on a busy machine).
    """
    _worker.warm(ref)


async def release_rank(fit_id: str) -> None:
    """Forget this worker's model, hand-offs and stop requests of a finished fit.

    A coroutine, so that ``client.run`` need not wait for a busy worker.
    """
    _mailbox.forget(fit_id)
    _STOP_REQUESTS.difference_update({t for t in _STOP_REQUESTS if t.startswith(fit_id)})
    _worker.release(fit_id)


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@dataclass
class _Running:
    """The client's view of the segment that runs."""

    token: str
    workers: list[str]
    target: int
    futures: list
    """The ranks' tasks, then the held start state."""


class DecentralizedEngine(DaskEngine):
    """All-reduce among Dask workers; one task per rank and segment, groups that persist."""

    name = "decentralized"
    warm_up = staticmethod(warm_rank)
    release_fit = staticmethod(release_rank)

    def __init__(self) -> None:
        super().__init__()
        self._running: _Running | None = None
        self._held: dict | None = None  # the weights the client last adopted
        self._first_segment = True

    def start(self, *args, **kwargs) -> None:
        self._running, self._held = None, None
        self._first_segment = True
        super().start(*args, **kwargs)
        # The weights the workers build their models with.
        self._held = {k: v.detach() for k, v in self._payload.module.state_dict().items()}

    def run_epoch(
        self, epoch: int, damper: BaseDamper, state: TrainState, on_update: OnUpdate
    ) -> None:
        module_state, optimizer_state = self.client_state()
        offset, restarts, target = 0, 0, None
        self.plan_ahead(damper, state, 0)
        if self._running is not None and self._more_ready():
            # The segment runs on fewer workers than it wants, and more are
            # ready now: start over on them.
            target = self._running.target
            self.note_rescale(state.model_updates, len(self._running.workers), target)
            self._end_segment()
        if self._running is not None:
            self._deliver(
                GoOn(
                    epoch,
                    _hyperparameters(self.optimizer),
                    self._changed_weights(module_state),
                )
            )
        while True:
            if self._running is None:
                if target is None:
                    target = self.guess_workers(damper, state, offset)
                # The first segment of a fit needs no state while the client's
                # module is still the payload's and its optimizer has no state:
                # every worker built its model from the payload (a large
                # model's weights would otherwise travel twice).
                pristine = (
                    self._first_segment
                    and not self.optimizer.state
                    and self._changed_weights(module_state) is None
                )
                self._first_segment = False
                self._start_segment(
                    SegmentStart(
                        epoch,
                        offset,
                        target,
                        None if pristine else module_state,
                        None if pristine else optimizer_state,
                        damper,
                        state,
                        token=f"{self.fit_id}-{epoch}-{offset}-{restarts}",
                        immediate=not damper.adaptive,
                        rendezvous=("", 0),
                        last_epoch=self._last_epoch(epoch),
                    )
                )
            try:
                handoff = self._await_handoff(epoch)
            except _LostWorkers as lost:
                restarts += 1
                self._end_segment()
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
                self._end_segment()
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
            self.note_rescale(
                state.model_updates, len(self._running.workers), handoff.wanted_workers
            )
            self._end_segment(ended_itself=True)
            target = handoff.wanted_workers
            self.plan_ahead(damper, state, offset)
        self.adopt_state(module_state, optimizer_state)
        self._held = module_state
        self.epochs_run += 1

    def _last_epoch(self, epoch: int) -> int | None:
        """The index of the fit's last planned epoch, seen from epoch ``epoch``."""
        if self.config.epochs is None:
            return None
        return epoch - self.epochs_run + self.config.epochs - 1

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

    def _start_segment(self, start: SegmentStart) -> None:
        """Start a new segment's ranks on the workers it gets (:meth:`_segment_workers`)."""
        workers = self._segment_workers(start.target_workers)
        if not workers:
            raise RuntimeError("The Dask cluster has no workers left to train on.")
        self.settle_rescale(len(workers))
        if len(workers) > 1:
            start.rendezvous = self.client.submit(
                _worker.open_rendezvous, start.token, workers=[workers[0]], pure=False
            ).result()
        payload = self.ensure_payload()
        # A segment's starting state goes to the cluster once; ranks fetch it from there.
        held = self.hold(start)
        futures = [
            self.client.submit(
                run_segment,
                payload,
                held,
                rank,
                len(workers),
                workers=[address],
                allow_other_workers=False,
                pure=False,
                key=f"adadamp-segment-{start.token}-{rank}",
            )
            for rank, address in enumerate(workers)
        ]
        self._running = _Running(start.token, workers, start.target_workers, [*futures, held])

    def _segment_workers(self, target: int) -> list[str]:
        """The workers of a new segment that wants ``target`` of them.

        Training does not wait for workers to start: when fewer than
        ``target`` hold the fit's model, the cluster is asked for ``target``
        and the segment starts on those that do. It runs short until more are
        ready, and is then stopped and restarted on them (:meth:`_await_handoff`).
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
        running = self._running
        if running is None:
            return False
        return len(running.workers) < running.target and len(self.ready_workers()) > len(
            running.workers
        )

    def _deliver(self, word: GoOn | None) -> None:
        """Give the running segment's ranks the client's word (see :mod:`._mailbox`)."""
        assert self._running is not None
        self.client.run(
            _mailbox.deliver,
            self._running.token,
            word,
            workers=self._running.workers,
            on_error="return",  # a worker gone is noticed while waiting for the ranks
        )

    def _end_segment(self, ended_itself: bool = False) -> None:
        """Stop the running segment's ranks (unless they ended it) and release its tasks."""
        running, self._running = self._running, None
        if running is None:
            return
        if not ended_itself:
            with contextlib.suppress(Exception):
                self.client.run(
                    _mailbox.deliver, running.token, None, workers=running.workers, wait=False
                )
        self.client.cancel(running.futures)

    def _await_handoff(self, epoch: int) -> Handoff:
        """Wait for rank 0's hand-off of ``epoch``; a failed rank or a lost worker ends it."""
        assert self._running is not None
        running = self._running
        rank0 = running.workers[0]
        misses, stop_asked = 0, False
        while True:
            try:
                got = self.client.run(
                    _mailbox.take, running.token, LIVENESS_POLL_S, workers=[rank0]
                )[rank0]
            except Exception:  # rank 0's worker is gone or unreachable: see below
                got = None
            if got is not None:
                assert isinstance(got, Handoff) and got.epoch == epoch
                return got
            failed = [f for f in running.futures if f.status == "error"]
            if failed:
                error = failed[0].exception()
                gone = set(running.workers) - set(available_workers(self.client))
                if gone or isinstance(error, _LOST_WORKER_ERRORS):
                    raise _LostWorkers(error)
                raise error
            if not stop_asked and self._more_ready():
                # Workers this short segment wants are ready: stop it at
                # the next update, to restart on them.
                self.client.run(request_stop, running.token, workers=[rank0])
                stop_asked = True
            # A rank whose worker died is rescheduled nowhere (it is pinned):
            # notice the worker's absence instead of waiting forever. Two
            # polls in a row, so one slow answer from a busy scheduler
            # does not restart a healthy segment.
            gone = set(running.workers) - set(available_workers(self.client))
            misses = misses + 1 if gone else 0
            if misses >= 2:
                raise _LostWorkers(RuntimeError(f"worker(s) {sorted(gone)} left the cluster"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._end_segment()
        self._held = None
        super().close()


class _LostWorkers(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
