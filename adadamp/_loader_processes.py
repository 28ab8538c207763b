"""Processes that read a dataset's coming batches ahead of the computation.

:class:`~adadamp.examples.DatasetExamples` with ``num_workers >= 1`` reads
here. Each process holds the dataset (forked, or pickled for ``spawn``) and
is sent each *stream* once: the batches of the coming updates, in order,
dealt to the processes in turn. It reads its batches one after the other,
at most ``prefetch_factor`` ahead of the ones taken, and sends each back
collated, by value, over a socket pair. A take is one receive of a batch
that is usually there already.

Why not a ``DataLoader``'s worker processes: it sends each batch's request
through a queue whose feeder thread, in this process, competes with the
computation for the interpreter lock, and its take does a few hundred
microseconds of bookkeeping. With 256 examples of 64 floats per batch and a
2 ms update on a 2-core machine, updates read through its loader processes
took 1.27 to 1.39 times as long as from arrays in most runs of
``benchmarks/data.py``, about what reading in the rank itself costs; these
took 0.98 to 1.17 times as long on one rank.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import random
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch._utils import ExceptionWrapper

# The DataLoader settings a Dataset is read with (the others are refused);
# persistent_workers is accepted and moot: the processes live as long as
# the examples they read. Without loader processes only collate_fn and
# pin_memory apply.
SETTINGS = (
    "num_workers",
    "collate_fn",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory",
    "timeout",
    "generator",
)

# Seconds a process is given to stop when asked, before it is terminated.
STOP_TIMEOUT_S = 5.0


def check_settings(settings: dict) -> None:
    """Refuse, by name, a loader setting that is not one of :data:`SETTINGS`."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(
            f"iterator_train__{sorted(unknown)[0]} is not a loader setting here; "
            f"a Dataset is read with {', '.join(SETTINGS)}."
        )


def read_batch(items, collate_fn: Callable[[list], Any], epoch: int, row) -> Any:
    """The collated items of the indices ``row`` (a tensor or array) of ``epoch``.

    ``items`` reads them in one ``items.read(epoch, indices)`` call.
    """
    return collate_fn(items.read(epoch, row.tolist()))


def _portable(batch: Any) -> Any:
    """``batch`` with its CPU tensors as NumPy arrays: they pickle by value, cheaply.

    (A tensor pickles through its storage; torch's multiprocessing pickler
    would hand it over in shared memory, a file descriptor per tensor.)
    """
    if isinstance(batch, torch.Tensor) and batch.device.type == "cpu":
        try:
            return batch.numpy()
        except (RuntimeError, TypeError):  # dtypes NumPy lacks (bfloat16), or grad
            return batch
    if type(batch) in (tuple, list):
        return type(batch)(_portable(b) for b in batch)
    return batch


def _seed_process(base_seed: int, worker_id: int) -> None:
    """Seed this process's generators as a ``DataLoader`` seeds its workers'."""
    seed = base_seed + worker_id
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _serve(
    items,
    collate_fn: Callable[[list], Any],
    worker_init_fn: Callable[[int], None] | None,
    worker_id: int,
    base_seed: int,
    credits,
    commands,
    results,
) -> None:
    """A loader process: read the batches of the latest stream, send them in order.

    ``commands`` brings ``(stream id, epoch, rows)`` per stream (rows of
    example indices, a batch each), None to stop;
    ``credits`` holds a unit per batch it may read ahead of those taken.
    """
    # A collection would walk every object inherited from the forked process,
    # writing to (and so copying) each page it touches: 0.3 s stalls here.
    gc.freeze()
    torch.set_num_threads(1)  # as a DataLoader's workers: the computation has the cores
    _seed_process(base_seed, worker_id)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)
    stream, epoch, rows = None, 0, iter(())
    try:
        while True:
            row = None if commands.poll() else next(rows, None)
            if row is None:  # a new stream, or this one is read: wait for the next
                command = commands.recv()
                if command is None:
                    break
                stream, epoch, rows = command[0], command[1], iter(command[2])
                continue
            credits.acquire()
            try:
                batch = _portable(read_batch(items, collate_fn, epoch, row))
                message = pickle.dumps((stream, True, batch), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # reading, collating or pickling: raised where it is taken
                error = ExceptionWrapper(where=f"in loader process {worker_id}")
                message = pickle.dumps((stream, False, error))
            results.send_bytes(message)
    except (EOFError, OSError):  # the reading process went away
        pass
    # Not the interpreter's own exit: it would run the finalizers and exit
    # handlers a forked process inherited, 10 to 18 ms of every fit's end.
    os._exit(0)


class LoaderProcesses:
    """``count`` loader processes reading batches of ``items`` (see the module docstring).

    Parameters
    ----------
    items
        Read through ``items.read(epoch, indices)``, one call per batch
        (:func:`read_batch`).
    count : int
        How many processes.
    collate_fn : callable
        Turns a batch's items into what :meth:`next` returns.
    settings : dict
        The ``DataLoader`` keywords of :data:`SETTINGS` besides those:
        ``worker_init_fn``, ``multiprocessing_context`` (default ``fork``
        where there is one), ``prefetch_factor`` (default 4, where a
        ``DataLoader``'s is 2: the batches a process may have read ahead, a
        margin for the moments it does not get a core), ``timeout``
        (seconds a batch may take; 0: no limit) and ``generator`` (that
        draws the processes' base seed, as a ``DataLoader``'s does).
    """

    def __init__(self, items, count: int, collate_fn: Callable[[list], Any], settings: dict):
        check_settings(settings)
        context: Any = settings.get("multiprocessing_context")
        if context is None or isinstance(context, str):
            context = multiprocessing.get_context(context)
        self.timeout = float(settings.get("timeout") or 0)
        ahead = int(settings.get("prefetch_factor") or 4)
        generator = settings.get("generator")
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        self._stream = 0
        self._turn = 0  # the process whose batch is taken next, in the stream's order
        self._processes, self._commands, self._results, self._credits = [], [], [], []
        for worker_id in range(count):
            commands_read, commands_write = context.Pipe(duplex=False)
            # A socket pair (duplex): its buffer holds a few batches, so a
            # process can send one while the last is not yet taken.
            results_here, results_there = context.Pipe(duplex=True)
            credits = context.Semaphore(ahead)
            process = context.Process(
                target=_serve,
                args=(
                    items,
                    collate_fn,
                    settings.get("worker_init_fn"),
                    worker_id,
                    base_seed,
                    credits,
                    commands_read,
                    results_there,
                ),
                daemon=True,
                name=f"adadamp-loader-{worker_id}",
            )
            process.start()
            commands_read.close()
            results_there.close()
            self._processes.append(process)
            self._commands.append(commands_write)
            self._results.append(results_here)
            self._credits.append(credits)
        self._finalizer = weakref.finalize(self, _stop, self._processes, self._commands)

    def stream(self, epoch: int, rows: Sequence[np.ndarray]) -> None:
        """Read a batch per row of indices of ``epoch`` from now on, dropping the last stream's."""
        self._stream += 1
        self._turn = 0
        count = len(self._processes)
        for worker_id, commands in enumerate(self._commands):
            commands.send((self._stream, epoch, rows[worker_id::count]))

    def next(self) -> Any:
        """The next batch of the stream, collated; a process's error is raised here."""
        worker_id = self._turn
        self._turn = (self._turn + 1) % len(self._processes)
        results = self._results[worker_id]
        while True:
            if self.timeout and not results.poll(self.timeout):
                raise RuntimeError(
                    f"Loader process {worker_id} sent no batch in {self.timeout:g} s "
                    "(iterator_train__timeout)."
                )
            try:
                stream, ok, payload = pickle.loads(results.recv_bytes())
            except (EOFError, OSError):
                process = self._processes[worker_id]
                process.join(timeout=1.0)
                raise RuntimeError(
                    f"Loader process {worker_id} (pid {process.pid}) exited unexpectedly "
                    f"(exit code {process.exitcode}) while reading the dataset."
                ) from None
            self._credits[worker_id].release()
            if stream != self._stream:
                continue  # read ahead for a stream since dropped
            if not ok:
                payload.reraise()
            return payload

    def close(self) -> None:
        """Stop the processes (they also stop when this object is collected)."""
        self._finalizer()


def _stop(processes: list, commands: list) -> None:
    for pipe in commands:
        try:
            pipe.send(None)
        except OSError:
            pass  # already gone
    for process in processes:
        process.join(timeout=STOP_TIMEOUT_S)
        if process.is_alive():
            process.terminate()
            process.join(timeout=STOP_TIMEOUT_S)
    for pipe in commands:
        pipe.close()
