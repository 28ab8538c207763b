"""What a decentralized segment's ranks run inside the Dask workers.

One task per rank and segment (:func:`run_segment`): the rank joins the
segment's process group, then runs its updates epoch after epoch, posts
each epoch's hand-off to the client and runs on into the next epoch while
the client works (:mod:`._mailbox`), until the worker count must change. The
client side is :mod:`.decentralized`.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .._wire import Sealed, TensorsApart
from ..dampers import BaseDamper
from ..examples import set_epoch
from ..scaling import WorkerCountRule
from ..schedule import UpdatePlan, epoch_permutation
from ..state import TrainState
from . import _mailbox, _worker
from ._host_sum import HostSum, open_host_sum
from ._loop import Reducer, reduced_nbytes, run_updates
from .base import UpdateRecord

# A rank whose peer died mid-update fails its all-reduce after this long at most.
GROUP_TIMEOUT = datetime.timedelta(seconds=60)
# Set to 0 in the workers' environment, sums always go through the process
# group, even between ranks of one host (see GroupReducer).
SHARED_MEMORY_ENV = "ADADAMP_SHARED_MEMORY"
# Ranks meet at the store within this long, or the segment is given up and
# restarted: a few liveness polls, so a rank whose peer died before meeting
# frees its worker's only thread quickly.
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=10)


@dataclass
class SegmentStart(TensorsApart):
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
class GoOn(TensorsApart):
    """The client's word to every rank of a running segment on its next epoch."""

    epoch: int
    hyperparameters: list[dict] = field(default_factory=list)
    """Each optimizer param group's settings (``lr``, ...) as the client has them."""
    module_state: dict | None = None
    """The client's weights, when its callbacks changed them since the last epoch."""


@dataclass
class Handoff(TensorsApart):
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
    """Sums over the ranks of a segment: through shared memory when they share a host.

    ``host_sum`` (:mod:`._host_sum`), when every rank could map it, carries
    the sums; otherwise the process ``group`` does (gloo, or nccl on GPUs).
    """

    def __init__(self, group, rank: int, world: int, host_sum: HostSum | None = None):
        self.group, self.rank, self.world = group, rank, world
        self.host_sum = host_sum

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.host_sum is not None:
            self.host_sum.all_reduce(tensor)
        elif self.group is not None:
            self.group.allreduce([tensor]).wait()

    def close(self) -> None:
        """Let the peers know this rank left (a peer still waiting on a sum stops)."""
        if self.host_sum is not None:
            self.host_sum.close()


@dataclass
class RankSegment:
    """What a rank's task keeps across the epochs of its segment."""

    token: str
    reducer: GroupReducer
    damper: BaseDamper
    state: TrainState
    rule: WorkerCountRule
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


def _process_group(start: SegmentStart, rank: int, world: int, device: str) -> Any:
    """The segment's process group, its store served by rank 0.

    Rank 0's store serves on the socket :func:`~._worker.open_rendezvous`
    bound, and owns that socket's descriptor and closes it when it is
    destroyed, or when it fails to form: the socket is detached from its
    Python object, or the descriptor would be closed twice, the second time
    when the worker had given its number to another file or socket (a later
    segment's store then failed with ENOTSOCK, and the fit with it).
    """
    host, port = start.rendezvous
    listen_fd = _worker.take_rendezvous(start.token).detach() if rank == 0 else None
    store = dist.TCPStore(
        host,
        port,
        world,
        rank == 0,
        timeout=RENDEZVOUS_TIMEOUT,
        master_listen_fd=listen_fd,
    )
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, world, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, world, GROUP_TIMEOUT)


def shared_memory_wanted() -> bool:
    """Whether this worker's environment lets ranks of one host sum through shared memory."""
    return os.environ.get(SHARED_MEMORY_ENV, "1") != "0"


def _join(
    model: _worker.WorkerModel,
    fit_id: str,
    start: SegmentStart,
    rank: int,
    world: int,
    given_up: Callable[[], bool],
) -> RankSegment:
    if start.module_state is not None:
        _worker.load_state(model, start.module_state, start.optimizer_state, start.token)
    group, host_sum = None, None
    if world > 1:
        group = _process_group(start, rank, world, model.config.device)
        if not model.config.device.startswith("cuda") and shared_memory_wanted():
            host_sum = open_host_sum(
                group,
                rank,
                world,
                reduced_nbytes(model.module),
                GROUP_TIMEOUT.total_seconds(),
                given_up,
            )
    # ``start`` may be the very object Dask serves to the other ranks: never mutate it.
    segment = RankSegment(
        start.token,
        GroupReducer(group, rank, world, host_sum),
        copy.deepcopy(start.damper),
        copy.deepcopy(start.state),
        WorkerCountRule(start.target_workers, immediate=start.immediate),
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


def run_segment(
    ref: _worker.PayloadRef,
    payload: _worker.FitPayload,
    given: SegmentStart | Sealed,
    rank: int,
    world: int,
) -> None:
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
    the state at that update and the segment ends. The segment's start comes
    sealed when it rides in the task itself (see :class:`~adadamp._wire.Sealed`).
    """
    start: SegmentStart = given.open() if isinstance(given, Sealed) else given
    model = _worker.worker_model(ref, payload)
    fit_id = ref.fit_id
    given_up = _released_check(fit_id)
    segment = _join(model, fit_id, start, rank, world, given_up)
    token = segment.token
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
        segment.reducer.close()
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
    now = _worker.optimizer_settings(model.optimizer)
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


def warm_rank(ref: _worker.PayloadRef, payload: _worker.FitPayload) -> None:
    """Build a worker's model for a fit before its first segment.

    A task of this module, so that the worker also imports what a rank runs
    (``torch.distributed`` takes seconds to import on a busy machine).
    """
    _worker.warm(ref, payload)


async def release_rank(fit_id: str) -> None:
    """Forget this worker's model, hand-offs and stop requests of a finished fit.

    A coroutine, so that ``client.run`` need not wait for a busy worker.
    """
    _mailbox.forget(fit_id)
    _STOP_REQUESTS.difference_update({t for t in _STOP_REQUESTS if t.startswith(fit_id)})
    _worker.release(fit_id)
