"""What both Dask engines do on the client: the cluster, its size, and the payload."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import itertools
import logging
import pickle
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch
from distributed import wait
from distributed.scheduler import KilledWorker
from torch import nn

from .._wire import Sealed
from ..cluster import cluster_client
from ..dampers import BaseDamper
from ..examples import Examples, TensorExamples
from ..scaling import WorkerScaler, taking_tasks, workers_info
from ..schedule import advance, next_update
from ..state import TrainState
from . import _worker
from ._warm import WorkerWarmer
from .base import Engine, TrainConfig

# Seconds a new worker is assumed to take to join, until one was measured.
DEFAULT_START_LATENCY_S = 5.0
# Updates planned ahead at most (the rest of a long fit is planned in turn).
MAX_PLANNED_UPDATES = 20_000
# Seconds the fit's payload may take to reach the cluster before the fit gives up.
PAYLOAD_TIMEOUT_S = 60.0
# A worker holds the payload, its module copy and the update's tensors: the
# training data may take at most this fraction of its memory limit.
PAYLOAD_MEMORY_FRACTION = 0.5

logger = logging.getLogger(__name__)

_LAZY_HINT = (
    "pass a dataset that opens its files lazily on the worker instead (such as "
    "adadamp.data.NpyDataset for .npy files; see the README, 'Data that does not fit "
    "in memory'), or give each worker more memory."
)


@dataclass
class _Plan:
    """The worker counts and batch sizes of a fit's planned updates, from ``first_update``."""

    first_update: int
    workers: list[int]
    examples_to: list[int]
    """Examples of the planned updates up to and including each one."""
    most_workers_from: list[int]
    """The most workers any planned update from each one on needs."""

    @classmethod
    def of(cls, first_update: int, planned: list[tuple[int, int]]) -> _Plan:
        workers = [w for w, _ in planned]
        most = list(itertools.accumulate(reversed(workers), max))[::-1]
        return cls(first_update, workers, list(itertools.accumulate(b for _, b in planned)), most)

    def reach(self, at: int, examples: float) -> int:
        """The index of the planned update by which ``examples`` more are used, from ``at``."""
        before = self.examples_to[at - 1] if at else 0
        end = bisect.bisect_left(self.examples_to, before + examples, lo=at)
        return min(end, len(self.workers) - 1)


def _open(sealed: Sealed):
    return sealed.open()


class _ByteCounter:
    """A file that only counts what is written to it (and out-of-band buffers)."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def buffer(self, buf: pickle.PickleBuffer) -> None:
        self.n += buf.raw().nbytes


def examples_nbytes(examples: Examples, backend: str) -> int:
    """How many bytes ``examples`` take pickled; raise a clear error if they cannot be.

    In-memory tensors are counted without pickling (that would copy them).
    Runs before any cluster work: a dataset that cannot travel to the
    workers should fail here, not in a worker.
    """
    if isinstance(examples, TensorExamples):
        return examples.X.nbytes + examples.y.nbytes
    counter = _ByteCounter()
    try:
        cloudpickle.Pickler(counter, protocol=5, buffer_callback=counter.buffer).dump(examples)
    except Exception as exc:
        data = getattr(examples, "dataset", examples)
        raise TypeError(
            f"The training data ({type(data).__name__}) cannot be pickled, and the "
            f"{backend!r} backend sends it to every Dask worker: {exc!r}. Hold file paths "
            "rather than open files, locks or connections (open them on first "
            "__getitem__, drop them in __getstate__: see adadamp.data), or use "
            "backend='local'."
        ) from exc
    return counter.n


def _gb(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


class DaskEngine(Engine):
    """Common client side of the centralized and decentralized engines.

    :meth:`start` opens the cluster (the given client, the current one, or an
    embedded ``LocalCluster`` that lives until :meth:`close`) and hands the
    fit's payload to the cluster once, in a task Dask can recompute; workers
    fetch it on their first task and keep it.
    """

    # The task that builds a worker's model ahead of its first task (see
    # ._warm); an engine whose tasks import more names a task of its own module.
    warm_up = staticmethod(_worker.warm)
    # The coroutine that forgets a finished fit on a worker; an engine that
    # keeps more there names one of its own.
    release_fit = staticmethod(_worker.release_soon)

    # Whether start() waits until the payload is on the cluster and every
    # worker there has built the model. An engine whose first tasks take the
    # payload as an argument, and go out with it, waits after sending them
    # instead (:meth:`await_payload`, :meth:`await_warm_ups`): a round of
    # Dask tasks fewer per fit.
    waits_in_start = True

    def __init__(self) -> None:
        self._exit = contextlib.ExitStack()
        self.payload: Any = None  # the payload's future, from start() to close()
        self._placed = self._published = False
        self.rescales: list[dict] = []
        self._rescale_began: tuple[dict, float] | None = None
        self.warmer: WorkerWarmer | None = None
        self._embedded = False

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
        self._examples_nbytes = examples_nbytes(examples, self.name)
        handle = self._exit.enter_context(
            cluster_client(
                client,
                n_workers_hint=config.min_workers,
                device=config.device,
                max_workers=config.max_workers,
            )
        )
        self.client = handle.client
        self._embedded = handle.embedded
        self.check_fits_in_workers(examples)
        self.scaler = WorkerScaler(handle)
        # A fit grows the cluster it is given as it needs, and shrinks it no
        # further than it found it: those workers were there for a reason.
        self._found_workers = self.scaler.keep = self.scaler.n_workers
        self._payload = _worker.FitPayload(
            fit_id=self.fit_id,
            module=copy.deepcopy(module).cpu(),
            criterion=criterion,
            optimizer=_worker.OptimizerRecipe.of(optimizer, module),
            examples=examples.to("cpu"),
            config=config,
        )
        self.rescales = []
        self.epochs_run = 0
        self._timed = (0.0, 0)  # (seconds, examples) of the updates finished so far
        self._plan: _Plan | None = None  # see _plan_from
        # Every worker builds the model ahead of its first task; those that
        # join later do it while training goes on. The warm-ups are sent
        # with the payload rather than after its round trip: Dask runs each
        # once the payload is in place, and a payload that fails fails them.
        self.payload = self.hold(self._payload)
        self._placed = self._published = False
        self.payload_ref = _worker.PayloadRef(self.fit_id, f"adadamp-payload-{self.fit_id}")
        self.warmer = WorkerWarmer(
            self.client, self.warm_up, (self.payload_ref, self.payload), self.fit_id
        )
        self.warmer.start()
        if self.waits_in_start:
            self.ensure_payload()
            self.await_warm_ups()

    def await_warm_ups(self, besides: Collection[str] = ()) -> None:
        """Wait until the workers sent a warm-up so far, ``besides`` those, hold the model.

        So the workers there at a fit's start are ready when it first wants
        them (a group of workers would wait for the slowest anyway).
        """
        assert self.warmer is not None  # start() made it
        try:
            self.warmer.wait(timeout=self.scaler.timeout, besides=besides)
        except Exception as error:
            raise self._payload_error(error) from error

    def check_fits_in_workers(self, examples: Examples) -> None:
        """Raise before placing the payload when its data would not fit in a worker's memory."""
        limits = {
            address: info.get("memory_limit") or 0
            for address, info in workers_info(self.client).items()
        }
        limited = {a: m for a, m in limits.items() if m}
        if not limited:
            return
        address, limit = min(limited.items(), key=lambda item: item[1])
        if self._examples_nbytes > PAYLOAD_MEMORY_FRACTION * limit:
            data = getattr(examples, "dataset", examples)
            raise ValueError(
                f"The training data ({type(data).__name__}, {_gb(self._examples_nbytes)} "
                f"pickled) does not fit in Dask worker {address} (memory limit "
                f"{_gb(limit)}; every worker holds a copy, within "
                f"{PAYLOAD_MEMORY_FRACTION:.0%} of its limit): {_LAZY_HINT}"
            )

    def _payload_error(self, error: BaseException | None) -> RuntimeError:
        """The error to raise when the payload could not be placed on the cluster."""
        payload = self._payload
        size = _gb(self._examples_nbytes)
        if error is None:
            return RuntimeError(
                f"The fit's module and data ({size} of data) did not reach a Dask worker "
                f"within {PAYLOAD_TIMEOUT_S:.0f} s (workers dying while loading it, or none "
                f"available): {_LAZY_HINT}"
            )
        if isinstance(error, (KilledWorker, MemoryError)):
            return RuntimeError(
                f"Dask workers died while loading the fit's module and data ({size} of "
                f"{type(payload.examples).__name__}; {error!r}), most likely over their "
                f"memory limit: {_LAZY_HINT}"
            )
        classes = ", ".join(
            f"{cls.__module__}.{cls.__qualname__}"
            for cls in (type(payload.module), type(payload.criterion),
                        payload.optimizer.cls, type(payload.examples))
        )  # fmt: skip
        return RuntimeError(
            f"The Dask cluster could not hold the fit's module and data: {error!r}. "
            f"Every Dask worker must be able to import {classes}: "
            "install the code that defines them there, or define them in the "
            "script that fits (Dask then sends them by value)."
        )

    def await_payload(self) -> None:
        """Wait until the payload is on the cluster (at once after the first time).

        Raises the cluster's error at once when the payload cannot be built
        there (a scheduler or worker that cannot unpickle the module, a worker
        that dies holding it): workers waiting for it would wait forever.
        """
        if self._placed:
            return
        future = self.payload
        with self.client.as_current():
            try:
                wait([future], timeout=PAYLOAD_TIMEOUT_S)
            except TimeoutError:
                raise self._payload_error(None) from None
        if future.status == "error":
            error = future.exception()
            raise self._payload_error(error) from error
        self._placed = True

    def ensure_payload(self) -> _worker.PayloadRef:
        """The handle of the payload, placed on the cluster and published under its name.

        For tasks that fetch the payload by name, only if their worker has
        not built the model (see :func:`~._worker.worker_model`).
        """
        self.await_payload()
        if not self._published:
            self.client.publish_dataset(self.payload, name=self.payload_ref.name)
            self._published = True
        return self.payload_ref

    def ready_workers(self) -> list[str]:
        """The available workers that hold the fit's model (see :mod:`._warm`)."""
        assert self.warmer is not None  # start() made it
        return self.warmer.ready()

    def hold(self, value):
        """A future of ``value`` that the cluster can always rebuild.

        Scattered data has no lineage: when the workers holding it leave (the
        cluster shrinks, a worker dies), it is gone. A task that returns the
        value keeps it in its spec, so Dask recomputes it where it is needed.
        The value goes sealed (:class:`~adadamp._wire.Sealed`): the scheduler
        relays it without unpickling it.
        """
        return self.client.submit(_open, Sealed(value), pure=False)

    def scale_to(self, workers: int) -> int:
        """Give the cluster ``workers`` workers, as far as it can."""
        return self.scaler.scale_to(workers)

    # ------------------------------------------------------------ rescales
    def note_rescale(self, update: int, workers_from: int, workers_to: int) -> None:
        """A rescale begins now, after update ``update``; its stall is measured on resuming."""
        self._rescale_began = (
            {"update": update, "from": workers_from, "to": workers_to, "wanted": workers_to},
            time.perf_counter(),
        )

    def settle_rescale(self, workers: int) -> None:
        """The rescale begun last runs on ``workers`` (fewer than wanted while more start).

        A rescale that found no more workers ready than it had is none: the
        count did not change, and nothing is recorded.
        """
        if self._rescale_began is not None:
            event = self._rescale_began[0]
            if workers == event["from"]:
                self._rescale_began = None
            else:
                event["to"] = workers

    def note_resumed(self, training_seconds: float) -> None:
        """The updates after a rescale came back, having computed for ``training_seconds``."""
        if self._rescale_began is not None:
            event, began = self._rescale_began
            stall = time.perf_counter() - began - training_seconds
            self.rescales.append({**event, "seconds": max(0.0, stall)})
            self._rescale_began = None

    def drain_rescales(self) -> list[dict]:
        rescales, self.rescales = self.rescales, []
        return rescales

    # ------------------------------------------------------------ planning ahead
    def plan_ahead(self, damper: BaseDamper, state: TrainState, offset: int) -> None:
        """Ask for the workers a planned schedule will soon need; keep those it needs later.

        For a damper that does not look at the model, the worker count of every
        coming update is known. The workers needed within the next epoch, or
        within twice the measured start latency of a worker at the measured
        training speed (whichever covers more updates), are asked for now,
        without waiting, so that they have started when the schedule needs
        them; and the cluster is not shrunk below what the rest of this fit
        needs (no worker is retired only to be started again). Adaptive
        dampers are followed as they go.
        """
        if damper.adaptive or not self.scaler.can_scale:
            return
        plan, at = self._plan_from(damper, state, offset)
        if not plan.workers:  # an empty training set plans no update
            return
        self.scaler.keep = max(self._found_workers, plan.most_workers_from[at])
        latency = self.scaler.start_latency_s or DEFAULT_START_LATENCY_S
        seconds, examples_timed = self._timed
        speed = examples_timed / seconds if seconds > 0 else None
        horizon = self.n_examples if speed is None else max(self.n_examples, 2 * latency * speed)
        soon = max(plan.workers[at : plan.reach(at, horizon) + 1])
        if soon > self.scaler.n_workers:
            self.scaler.request(soon)

    def _plan_from(self, damper: BaseDamper, state: TrainState, offset: int) -> tuple[_Plan, int]:
        """The fit's planned updates, and the index of the next one in them.

        Planned once per fit, not per epoch: planning the rest of a fit at
        every epoch made the client's work grow with the square of the fit's
        length (a 200-epoch fit's client took a core planning). An epoch run
        again (a callback changed the weights) rewinds the state, and so the
        index; past the planned updates (a fit longer than
        :data:`MAX_PLANNED_UPDATES`), the rest is planned in turn.
        """
        plan = self._plan
        at = -1 if plan is None else state.model_updates - plan.first_update
        if plan is None or not 0 <= at < len(plan.workers):
            epochs_left = max(1, (self.config.epochs or 1) - self.epochs_run)
            planned = self.planned_workers(damper, state, offset, epochs_left)
            plan = self._plan = _Plan.of(state.model_updates, planned)
            at = 0
        return plan, at

    def note_progress(self, records: list) -> None:
        """Count the training time and examples of finished updates (the speed plan_ahead uses)."""
        seconds, examples = self._timed
        self._timed = (
            seconds + sum(r.duration for r in records),
            examples + sum(r.batch_size for r in records),
        )

    def planned_workers(
        self, damper: BaseDamper, state: TrainState, offset: int, epochs: int
    ) -> list[tuple[int, int]]:
        """``(workers, batch size)`` of the next updates over ``epochs`` epochs (capped)."""
        damper, state = copy.deepcopy(damper), copy.deepcopy(state)
        n, epoch = state.n_examples, 0
        planned: list[tuple[int, int]] = []
        while epoch < epochs and len(planned) < MAX_PLANNED_UPDATES:
            plan = next_update(damper, state, self.config.max_batch_size, offset)
            planned.append((self.config.workers_for(plan.full_batch_size), plan.batch_size))
            advance(state, plan.batch_size)
            offset += plan.batch_size
            if offset >= n:
                offset, epoch = 0, epoch + 1
        return planned

    def guess_workers(self, damper: BaseDamper, state: TrainState, offset: int) -> int:
        """The worker count the next update will want, without touching the damper.

        For dampers that need the training loss, the last loss the fit saw
        stands in; the workers correct the count if the fresh one says otherwise.
        """
        damper, state = copy.deepcopy(damper), copy.deepcopy(state)
        if damper.needs_loss:
            # The loss is not known before the workers evaluate it; the last
            # one seen stands in (before any, any value does: the first loss
            # a damper sees is its reference, e.g. AdaDamp's B = initial).
            if state.train_loss is None:
                state.train_loss = 1.0
            try:
                plan = next_update(damper, state, self.config.max_batch_size, offset)
            except (ValueError, RuntimeError):  # the stand-in did not suit this damper
                return self.scaler.n_workers or self.config.min_workers
        else:
            plan = next_update(damper, state, self.config.max_batch_size, offset)
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
            if self.payload is not None:
                # The workers forget the fit, which also wakes ranks waiting
                # for a word. On a cluster that stays, in messages the fit
                # does not wait for: on a short fit, waiting for them is a
                # measurable part of its wall-clock. An embedded cluster is
                # closed below, and its workers close sooner with their ranks woken.
                forget = (self.client, self.release_fit, self.fit_id, self.payload_ref.name)
                with contextlib.suppress(Exception):
                    if self._embedded:
                        self.client.sync(_forget_fit, *forget)
                    else:
                        loop = self.client.loop
                        assert loop is not None  # a connected client has its loop
                        loop.add_callback(_forget_fit, *forget)
                self.payload.release()
                self.payload = None
        finally:
            if self.warmer is not None:
                with contextlib.suppress(Exception):
                    self.warmer.close()
                self.warmer = None
            self._exit.close()


async def _forget_fit(client: Any, release_fit, fit_id: str, name: str) -> None:
    """Make the workers forget a finished fit and the scheduler its payload's name.

    Both at once rather than one after the other. ``release_fit`` is a
    coroutine, so a worker busy warming up (a GIL-bound import) acknowledges
    it without being waited for; a worker keeps no model of a fit released
    before its build finished (:func:`~._worker.worker_model`).
    """

    async def release() -> None:
        # Not to workers on their way out: a call to one that no longer
        # answers waits for the connection timeouts.
        workers = taking_tasks((await client.scheduler.identity(n_workers=-1))["workers"])
        if workers:
            await client._run(release_fit, fit_id, workers=workers, wait=False, on_error="ignore")

    outcomes = await asyncio.gather(
        release(), client._unpublish_dataset(name=name), return_exceptions=True
    )
    for what, outcome in zip(("releasing the workers' models", "unpublishing"), outcomes):
        if isinstance(outcome, Exception):
            logger.warning("Ending fit %s, %s failed: %r", fit_id, what, outcome)
