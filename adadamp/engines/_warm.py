"""Workers that hold a fit's model before the fit needs them.

A worker that joins a cluster has imported nothing: its first task of a fit
imports torch and the engine and builds the module and data from the
payload, seconds on a busy machine, and a process group waits for its
slowest rank. So every worker the cluster has, or gains while the fit runs,
is sent one warm-up task as soon as it is seen, from a thread of the client
that looks every :data:`POLL_S` seconds (so a skorch callback that keeps the
client busy does not hold it back). The engines start or grow segments on
the workers whose warm-up has finished.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from ..scaling import available_workers

# Seconds between two looks for workers that joined.
POLL_S = 0.25


class WorkerWarmer:
    """Send each worker of a cluster one warm-up task, as soon as it joins.

    Parameters
    ----------
    client : distributed.Client
        The fit's client.
    task : callable
        The warm-up, called on the worker as ``task(*args)``.
    args : tuple
        Its arguments (the payload's handle and future).
    key_prefix : str
        Prefix of the tasks' keys (the fit's id).
    """

    def __init__(self, client: Any, task: Callable[..., None], args: tuple, key_prefix: str):
        self.client, self.task, self.args, self.key_prefix = client, task, args, key_prefix
        self._tasks: dict[str, Any] = {}  # worker address -> its warm-up future
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Warm the workers there now, and those that join from now on."""
        self.warm_new_workers()
        self._thread = threading.Thread(target=self._watch, name="adadamp-warmer", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.warm_new_workers()
            except Exception:  # the client is closing: the fit ends without us
                return

    def warm_new_workers(self) -> None:
        with self._lock:
            for address in available_workers(self.client):
                if address not in self._tasks:
                    self._tasks[address] = self.client.submit(
                        self.task,
                        *self.args,
                        workers=[address],
                        allow_other_workers=False,
                        pure=False,
                        # Ahead of the fit's other tasks on the worker, which
                        # may go out with it (a rank's task would hold the
                        # worker's thread for a whole segment): the worker
                        # counts as ready once its warm-up is done.
                        priority=1,
                        key=f"adadamp-warm-{self.key_prefix}-{len(self._tasks)}",
                    )

    def ready(self) -> list[str]:
        """The available workers whose warm-up has finished, in Dask's order."""
        with self._lock:
            done = {a for a, task in self._tasks.items() if task.status == "finished"}
        return [a for a in available_workers(self.client) if a in done]

    def warmed_or_warming(self) -> list[str]:
        """The available workers that were sent a warm-up, finished or not, in Dask's order."""
        with self._lock:
            sent = set(self._tasks)
        return [a for a in available_workers(self.client) if a in sent]

    def wait(self, timeout: float, besides: Collection[str] = ()) -> None:
        """Wait up to ``timeout`` seconds for the warm-ups sent so far; raise the first error.

        A worker that cannot build the model (it cannot import the module's
        class, say) fails here with Dask's error, before any segment starts
        on it. A worker that left the cluster is not waited for, nor are the
        workers ``besides``.
        """
        from distributed import wait

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            present = set(available_workers(self.client)) - set(besides)
            with self._lock:
                tasks = [t for a, t in self._tasks.items() if a in present]
            for task in tasks:
                if task.status == "error":
                    raise task.exception()
            pending = [t for t in tasks if not t.done()]
            if not pending:
                return
            with self.client.as_current():
                with contextlib.suppress(TimeoutError):
                    wait(pending, timeout=min(POLL_S * 4, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            tasks, self._tasks = list(self._tasks.values()), {}
        # Released, not cancelled: a cancel waits for the scheduler's answer
        # (milliseconds of every fit), a release is one message, and a
        # warm-up still queued or running is let go all the same.
        for task in tasks:
            task.release()
