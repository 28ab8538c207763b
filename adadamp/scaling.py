"""How many workers a batch size calls for, and making a cluster have them."""

from __future__ import annotations

import math
import time
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing distributed is slow; workers_for does not need it
    from distributed import Client

    from .cluster import ClusterHandle


def workers_for(
    batch_size: float, grads_per_worker: int, min_workers: int = 1, max_workers: int | None = None
) -> int:
    """``clip(ceil(batch_size / grads_per_worker), min_workers, max_workers)``.

    Growing the workers with the batch keeps the examples per worker, and so
    the time of one model update, about constant.
    """
    wanted = max(1, math.ceil(batch_size / grads_per_worker))
    wanted = max(wanted, min_workers)
    if max_workers is not None:
        wanted = min(wanted, max_workers)
    return wanted


class WorkerCountRule:
    """When the worker count follows the wanted count: hysteresis against flapping.

    A batch size that moves with a noisy signal (adaptive dampers) would
    otherwise restart the workers at every wobble across a multiple of
    ``grads_per_worker``. The count changes

    - at once when ``immediate`` (a planned schedule: its changes are meant),
      or when the wanted count is more than ``margin`` times the current one,
      or less than the current one divided by ``margin``;
    - otherwise once the wanted count has differed from the current one for
      ``patience`` updates in a row.

    Every rank of a decentralized segment applies the rule to the same
    sequence of batch sizes, so all ranks decide alike without talking.

    Parameters
    ----------
    current : int
        The worker count in use.
    immediate : bool, default False
    patience : int, default 8
    margin : float, default 2.0
    """

    def __init__(
        self, current: int, immediate: bool = False, patience: int = 8, margin: float = 2.0
    ):
        self.current = current
        self.immediate = immediate
        self.patience = patience
        self.margin = margin
        self._streak = 0

    def changes(self, wanted: int) -> bool:
        """Whether the count should become ``wanted`` before the next update."""
        if wanted == self.current:
            self._streak = 0
            return False
        self._streak += 1
        far = wanted > self.margin * self.current or wanted * self.margin < self.current
        return self.immediate or far or self._streak >= self.patience


# --- Making a cluster have the workers a batch size calls for ---------------

#: Worker states in which a worker takes no new tasks: it is leaving.
_LEAVING = frozenset({"closing", "closing_gracefully", "closed"})


def _address_key(address: str) -> tuple[str, str, int, str]:
    """Sort key that orders ports numerically ("...:9999" before "...:10000")."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location, default_port=0)
        return scheme, host, int(port), address
    except (ValueError, TypeError):
        # Addresses without a port (inproc://...) sort by their text.
        return "", address, 0, address


# Seconds one answer of the scheduler about its workers serves: an engine
# asks several times per step (a dozen times as a fit starts), each a round
# trip to the scheduler of about a millisecond on one machine, more on a
# network; a worker that joins or leaves is seen at most this much later.
WORKERS_INFO_MAX_AGE_S = 0.05

# client -> (when asked, the scheduler's answer)
_workers_answers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def workers_info(client: Client) -> dict[str, dict]:
    """The scheduler's workers, all of them, asked of the scheduler itself.

    ``client.scheduler_info()`` can answer from a cache that the client
    refreshes in the background without per-worker entries, so it sometimes
    lists no workers at all; the engines would then see a healthy cluster as
    empty. An answer younger than :data:`WORKERS_INFO_MAX_AGE_S` is reused
    (:func:`forget_workers_info` drops it). Callers must not modify it.
    """
    asked = time.monotonic()
    answer = _workers_answers.get(client)
    if answer is not None and asked - answer[0] < WORKERS_INFO_MAX_AGE_S:
        return answer[1]
    workers = client.sync(client.scheduler.identity, n_workers=-1)["workers"]
    _workers_answers[client] = (asked, workers)
    return workers


def forget_workers_info(client: Client) -> None:
    """Make the next :func:`workers_info` ask the scheduler (its workers were just changed)."""
    _workers_answers.pop(client, None)


def available_workers(client: Client) -> list[str]:
    """The addresses of the client's workers that take tasks, sorted.

    Parameters
    ----------
    client : distributed.Client

    Returns
    -------
    list of str
        Worker addresses ordered by scheme, host, then port as a number, so
        that the same cluster gives the same order (and so the same slices of
        a batch go to the same workers) on every call. Workers that are
        closing are left out.
    """
    return taking_tasks(workers_info(client))


def taking_tasks(workers: dict[str, dict]) -> list[str]:
    """The addresses, sorted as :func:`available_workers` sorts them, of the scheduler's
    ``workers`` (its identity's ``"workers"``) that are not closing."""
    running = [addr for addr, info in workers.items() if info.get("status") not in _LEAVING]
    return sorted(running, key=_address_key)


class WorkerScaler:
    """Make a cluster have the number of workers a batch size calls for.

    Parameters
    ----------
    handle : adadamp.cluster.ClusterHandle
        The cluster to scale, from :func:`adadamp.cluster.cluster_client`.
    timeout : float, default 60
        Seconds to wait for the cluster to reach a new worker count.
    poll_interval : float, default 0.05
        Seconds between checks of the worker count while it falls.

    Notes
    -----
    If the handle's cluster object can scale (``client.cluster.scale``
    exists), :meth:`scale_to` calls ``cluster.scale(max(n, keep))`` and waits
    until the scheduler lists exactly that many workers; the engine runs on
    the first ``n``. Workers asked for ahead with :meth:`request` are found
    ready. Otherwise (a client connected to an address has no cluster object)
    the workers cannot be changed from here, and :meth:`scale_to` returns
    ``min(n, workers available now)``, counted afresh at every call so that
    workers that join mid-fit are used.

    A scalable cluster is acted on only when the wanted count differs from the
    last one set, so asking for the same count every update costs nothing and
    does not restart workers; call :meth:`reset` to make it look again (e.g.
    after a worker was lost).
    """

    def __init__(self, handle: ClusterHandle, timeout: float = 60.0, poll_interval: float = 0.05):
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}")
        self.handle = handle
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._target: int | None = None  # the count last set, None: none yet
        self._n_workers: int | None = None  # the count the engine may use
        self.keep = 0
        """The cluster is not shrunk below this (workers the rest of the fit will need)."""
        self._requested: tuple[int, float] | None = None  # (count, monotonic time) asked ahead
        self.start_latency_s: float | None = None
        """Seconds from asking for a worker to its joining, as last measured on this cluster."""

    @property
    def client(self) -> Client:
        """The ``distributed.Client`` of the handle."""
        return self.handle.client

    @property
    def can_scale(self) -> bool:
        """Whether :meth:`scale_to` can change the number of workers."""
        return bool(self.handle.can_scale)

    @property
    def n_workers(self) -> int:
        """The number of workers the engine runs on (to record per update).

        The result of the last :meth:`scale_to`; before the first, the number
        of workers the cluster has now.
        """
        if self._n_workers is None:
            return len(available_workers(self.client))
        return self._n_workers

    def workers(self) -> list[str]:
        """The addresses of the workers to run on: the first :attr:`n_workers`
        of :func:`available_workers`."""
        return available_workers(self.client)[: self.n_workers]

    def reset(self) -> None:
        """Forget the last count set, so that the next :meth:`scale_to` acts."""
        self._target = None
        self._n_workers = None

    def request(self, n_workers: int) -> None:
        """Ask the cluster to grow to ``n_workers`` now, without waiting for them.

        The engines call this ahead of a planned growth, so that the workers
        have started when the schedule needs them; :meth:`scale_to` then finds
        them ready. A cluster that cannot scale from here is left alone.
        """
        if self.handle.max_workers is not None:
            n_workers = min(n_workers, self.handle.max_workers)
        if not self.can_scale or n_workers <= len(available_workers(self.client)):
            return
        # Kept while the fit runs: a later, smaller scale_to must not cancel it.
        self.keep = max(self.keep, n_workers)
        if self._requested is None or self._requested[0] < n_workers:
            assert self.handle.cluster is not None  # can_scale said so
            self.handle.cluster.scale(max(n_workers, self._target or 0))
            self._requested = (n_workers, time.monotonic())

    def running_on(self, n_workers: int) -> None:
        """Record that the engine runs on ``n_workers`` it found ready, without scaling."""
        self._note_arrivals()
        self._target = self._n_workers = n_workers

    def _note_arrivals(self) -> None:
        """Measure the start latency once the workers asked for ahead have joined."""
        if self._requested is not None:
            count, asked = self._requested
            if len(available_workers(self.client)) >= count:
                self.start_latency_s = time.monotonic() - asked
                self._requested = None

    def scale_to(self, n_workers: int) -> int:
        """Make the cluster have ``n_workers`` workers, as far as it can.

        Parameters
        ----------
        n_workers : int
            The wanted number of workers, e.g. from :func:`workers_for`. It is
            capped at the handle's ``max_workers``, if any.

        Returns
        -------
        int
            The number of workers to run on: the (capped) wanted count if the
            cluster can scale, else ``min(wanted, workers available)``.

        Raises
        ------
        ValueError
            If ``n_workers`` is not a positive int.
        TimeoutError
            If the cluster did not reach the count within ``timeout`` seconds,
            or (when it cannot scale) has no worker at all.
        """
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be a positive int; got {n_workers!r}")
        wanted = n_workers
        if self.handle.max_workers is not None:
            wanted = min(wanted, self.handle.max_workers)
        if not self.can_scale:
            # Workers come and go by themselves (a cluster reached by address):
            # count them afresh, so that ones that joined mid-fit are used.
            self._target = wanted
            self._n_workers = min(wanted, self._count_or_wait_for_one())
            return self._n_workers
        self._note_arrivals()
        if wanted == self._target and self._n_workers is not None:
            return self._n_workers

        # Until the count is reached, a failure must not leave a stale target
        # that would stop the next call from trying again.
        self.reset()
        have = len(available_workers(self.client))
        asked = self._requested[0] if self._requested is not None else 0
        if wanted > have:
            # Grow, to what was asked ahead if that is more; run once ``wanted`` are in.
            began = time.monotonic()
            self._scale_cluster(max(wanted, asked), until=wanted)
            if self._requested is None:
                self.start_latency_s = time.monotonic() - began
        elif max(wanted, self.keep, asked) < have:
            # Shrink, but keep the workers the rest of the fit needs.
            self._scale_cluster(max(wanted, self.keep, asked))
        self._note_arrivals()
        self._target = wanted
        self._n_workers = wanted
        return wanted

    def _scale_cluster(self, size: int, until: int | None = None) -> None:
        """Scale the cluster to ``size``; wait for ``until`` workers (default: exactly ``size``)."""
        deadline = time.monotonic() + self.timeout
        before = len(available_workers(self.client))
        assert self.handle.cluster is not None  # can_scale said so
        self.handle.cluster.scale(size)
        forget_workers_info(self.client)
        try:
            if until is not None:
                self._wait_for_workers(until)
                return
            if size > before:
                self._wait_for_workers(size)
            # Growing may overshoot while workers from an earlier shrink are
            # still leaving; shrinking ends when the leavers are gone. Both:
            # wait for the exact count.
            while (have := len(available_workers(self.client))) != size:
                if time.monotonic() > deadline:
                    raise TimeoutError
                time.sleep(self.poll_interval)
        except TimeoutError:
            have = len(available_workers(self.client))
            raise TimeoutError(
                f"wanted {until or size} Dask workers (from {before}) but the cluster has {have} "
                f"after {self.timeout} s. Give the cluster more time (timeout), lower max_workers, "
                "or check that it has the cores and memory for that many workers (see its logs)"
            ) from None

    def _wait_for_workers(self, n_workers: int) -> None:
        """Wait for the cluster to have ``n_workers``, within :attr:`timeout`.

        Then forget the scheduler's last answer about its workers: another
        thread (the warm-ups') may have read it while they joined.
        """
        self.client.wait_for_workers(n_workers, timeout=self.timeout)
        forget_workers_info(self.client)

    def _count_or_wait_for_one(self) -> int:
        have = len(available_workers(self.client))
        if have:
            return have
        try:
            self._wait_for_workers(1)
        except TimeoutError:
            raise TimeoutError(
                f"the Dask cluster at {self.client.scheduler.address} has no worker after "
                f"{self.timeout} s and cannot be scaled from here. Start workers for it "
                "(dask worker <address>), or pass client=None to start a local cluster"
            ) from None
        return len(available_workers(self.client))
