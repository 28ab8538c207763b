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
change. :func:`~._ranks.run_segment`, what runs in the workers, is this
module's other half. When the damper's batch size calls for another worker
count (see :class:`~adadamp.scaling.WorkerCountRule`), or a worker is lost,
rank 0 posts the state at that update, and a new group starts from it on
the new workers. A group starts on the workers that already hold the fit's
model (:mod:`._warm`); while it is short of workers, the client asks rank 0
to stop it as soon as more are ready, and every rank stops at the same
update (the vote rides in the reduced buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from .._wire import Sealed
from ..dampers import BaseDamper
from ..scaling import available_workers, taking_tasks
from ..state import TrainState
from . import _mailbox, _worker
from ._dask import DaskEngine
from ._ranks import (
    GoOn,
    Handoff,
    SegmentStart,
    release_rank,
    request_stop,
    run_segment,
    warm_rank,
)
from .base import OnUpdate

logger = logging.getLogger(__name__)

# Segment restarts after lost workers, before the fit gives up.
MAX_RESTARTS = 3
# Seconds between checks that a segment's workers are still alive.
LIVENESS_POLL_S = 1.0
# Seconds between checks, while the client waits on a segment's worker, that no rank failed.
FAILURE_POLL_S = 0.02
# What a rank raises when a peer or its own worker goes away.
_LOST_WORKER_ERRORS = (dist.DistError, KilledWorker, CommClosedError, OSError)


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
    waits_in_start = False
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
        word = None  # for a segment that runs on: the client's word on this epoch
        if self._running is not None:
            word = GoOn(
                epoch,
                _worker.optimizer_settings(self.optimizer),
                self._changed_weights(module_state),
            )
        while True:
            try:
                if self._running is None:
                    if target is None:
                        target = self.guess_workers(damper, state, offset)
                    first, self._first_segment = self._first_segment, False
                    # The first segment of a fit needs no state while the client's
                    # module is still the payload's and its optimizer has no state:
                    # every worker built its model from the payload (a large
                    # model's weights would otherwise travel twice).
                    pristine = (
                        first
                        and not self.optimizer.state
                        and self._changed_weights(module_state) is None
                    )
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
                        ),
                        first,
                    )
                # The word goes to this segment only: a segment started
                # after a rescale or a loss starts from the client's state.
                sent, word = word, None
                handoff = self._await_handoff(epoch, sent)
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
            self._end_segment(tell_ranks=False)
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

    def _start_segment(self, start: SegmentStart, first: bool) -> None:
        """Start a new segment's ranks on the workers it gets (:meth:`_segment_workers`).

        The fit's ``first`` segment goes out right behind the payload and its
        warm-ups (see :attr:`waits_in_start`); the client waits for the
        payload and the other workers' warm-ups only then, while the ranks train.
        """
        workers = self._segment_workers(start.target_workers, first)
        if not workers:
            raise RuntimeError("The Dask cluster has no workers left to train on.")
        self.settle_rescale(len(workers))
        if len(workers) > 1:
            start.rendezvous = self.client.run(
                _worker.open_rendezvous, start.token, workers=[workers[0]]
            )[workers[0]]
        # A segment's starting weights go to the cluster once; ranks fetch them
        # from there. A start without weights (the fit's first segment) is a
        # few kilobytes: it rides in the ranks' tasks, a round of tasks fewer,
        # sealed like a held value (its damper's class may be one that only
        # the workers can import).
        held = self.hold(start) if start.module_state is not None else Sealed(start)
        futures: list = [
            self.client.submit(
                run_segment,
                self.payload_ref,
                self.payload,
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
        if not isinstance(held, Sealed):
            futures.append(held)
        self._running = _Running(start.token, workers, start.target_workers, futures)
        self.await_payload()
        if first:
            # Not for the segment's own workers, whose ranks hold their
            # threads (their warm-ups run first, or the ranks build the model).
            self.await_warm_ups(besides=workers)

    def _segment_workers(self, target: int, first: bool = False) -> list[str]:
        """The workers of a new segment that wants ``target`` of them.

        Training does not wait for workers to start: when fewer than
        ``target`` hold the fit's model, the cluster is asked for ``target``
        and the segment starts on those that do. It runs short until more are
        ready, and is then stopped and restarted on them (:meth:`_await_handoff`).
        For a fit's ``first`` segment, the workers its warm-ups went to count
        as ready: its ranks run right after the warm-ups. Only with no worker
        ready at all (a cluster without workers yet) is the cluster scaled
        and waited for. Otherwise it is scaled to
        ``target`` (shrunk, as far as it may be) and the ready workers come first.
        """

        def ready_workers() -> list[str]:
            assert self.warmer is not None  # start() made it
            return self.warmer.warmed_or_warming() if first else self.ready_workers()

        ready = ready_workers()
        if ready and target > len(ready):
            self.scaler.request(target)
            self.scaler.running_on(len(ready))
            return ready
        world = self.scale_to(target)
        ready = ready_workers()  # again: shrinking may have retired some
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

    def _tell_end(self, running: _Running) -> None:
        """Tell a segment's ranks to end (a word of None, see :mod:`._mailbox`), without waiting."""
        # Only to workers the scheduler still has: a run on a lost one waits
        # for its connect timeouts; a rank lost is noticed while waiting for the ranks.
        present = set(available_workers(self.client))
        if not present.intersection(running.workers):
            return
        self._run_on(
            running,
            _mailbox.deliver,
            running.token,
            None,
            workers=[w for w in running.workers if w in present],
            wait=False,
            on_error="return",
        )

    def _run_on(self, running: _Running, function, *args, **kwargs) -> dict | None:
        """``client.run(function, *args, **kwargs)``, or None if a rank of ``running`` fails first.

        A run on a worker that died, but that the scheduler still listed (it
        died a moment ago), waits out Dask's connect timeouts: 30 s by
        default. Its peers notice at once (a sum with a dead peer fails), and
        their tasks' failure ends the wait instead; so does the scheduler
        no longer listing a worker of the run, asked every
        :data:`LIVENESS_POLL_S`. The run goes on without being waited for,
        so the living workers still get it.
        """
        targets = set(kwargs.get("workers") or running.workers)

        async def run() -> dict | None:
            call = asyncio.ensure_future(
                self.client.run(function, *args, asynchronous=True, **kwargs)
            )
            call.add_done_callback(lambda done: done.cancelled() or done.exception())
            loop = asyncio.get_running_loop()
            next_check = loop.time() + LIVENESS_POLL_S
            while not call.done():
                if any(future.status == "error" for future in running.futures):
                    return None
                if loop.time() >= next_check:
                    listed = await self.client.scheduler.identity(n_workers=-1)
                    if not targets <= set(taking_tasks(listed["workers"])):
                        return None
                    next_check = loop.time() + LIVENESS_POLL_S
                await asyncio.wait({call}, timeout=FAILURE_POLL_S)
            return call.result()

        return self.client.sync(run)

    def _end_segment(self, tell_ranks: bool = True, wait: bool = True) -> None:
        """Let go of the running segment's tasks, first telling its ranks to end (``tell_ranks``).

        No word is needed when the ranks ended the segment themselves, or
        when the fit's release (:meth:`close`) ends them. ``wait=False``
        lets the tasks go without waiting for the scheduler: their ranks
        end when the fit is released.
        """
        running, self._running = self._running, None
        if running is None:
            return
        if tell_ranks:
            with contextlib.suppress(Exception):
                self._tell_end(running)
        if wait:
            self.client.cancel(running.futures)
        else:
            for future in running.futures:
                future.release()

    def _await_handoff(self, epoch: int, word: GoOn | None = None) -> Handoff:
        """Wait for rank 0's hand-off of ``epoch``; a failed rank or a lost worker ends it.

        ``word``: the client's word on ``epoch`` to a segment that runs on,
        delivered to its ranks in the same call as the first wait.
        """
        assert self._running is not None
        running = self._running
        rank0 = running.workers[0]
        misses, stop_asked = 0, False
        while True:
            present = set(available_workers(self.client))
            gone = set(running.workers) - present
            got = None
            if rank0 in gone:
                # A run on a worker the scheduler lost waits for its connect
                # timeouts (a minute): wait one poll instead.
                time.sleep(LIVENESS_POLL_S)
            else:
                with contextlib.suppress(Exception):  # gone since, or unreachable: see below
                    if word is None:
                        taken = self._run_on(
                            running, _mailbox.take, running.token, LIVENESS_POLL_S, workers=[rank0]
                        )
                    else:
                        # Once only, even if the call fails: a word delivered
                        # twice would be read as the next epoch's. Only to
                        # workers the scheduler still has (see _tell_end); a
                        # worker gone is noticed below.
                        sent, word = word, None
                        taken = self._run_on(
                            running,
                            _mailbox.exchange,
                            running.token,
                            sent,
                            LIVENESS_POLL_S,
                            rank0,
                            workers=[w for w in running.workers if w in present],
                            on_error="return",
                        )
                    got = None if taken is None else taken[rank0]
            if isinstance(got, Handoff):
                assert got.epoch == epoch
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
                self._run_on(running, request_stop, running.token, workers=[rank0])
                stop_asked = True
            # A rank whose worker died is rescheduled nowhere (it is pinned):
            # notice the worker's absence instead of waiting forever. Two
            # polls in a row, so one slow answer from a busy scheduler
            # does not restart a healthy segment.
            misses = misses + 1 if gone else 0
            if misses >= 2:
                raise _LostWorkers(RuntimeError(f"worker(s) {sorted(gone)} left the cluster"))

    def close(self) -> None:
        # The ranks need no word to end: releasing the fit (DaskEngine.close)
        # wakes and ends them, as does closing an embedded cluster; only
        # their tasks are let go here.
        with contextlib.suppress(Exception):
            self._end_segment(tell_ranks=False, wait=False)
        self._held = None
        super().close()


class _LostWorkers(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause
