"""What the experiment runners share around the estimator.

The backends an experiment may run on, the torch threads of this process,
one Dask client for a whole experiment, the test-set scoring callback and an
argparse type. :mod:`~adadamp.experiments.train`,
:mod:`~adadamp.experiments.compare` and :mod:`~adadamp.experiments.synthetic`
import it; it imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from skorch.callbacks import Callback

from ..engines import BACKENDS

__all__ = [
    "BACKEND_CHOICES",
    "DEFAULT_BACKEND",
    "TestScoring",
    "dask_client",
    "freeze_what_is_held",
    "positive_int",
    "torch_threads",
    "worker_limit",
]

#: The backend the experiment commands use unless ``--backend`` says otherwise:
#: an embedded Dask cluster whose workers grow with the batch size.
DEFAULT_BACKEND = "decentralized"

#: ``"auto"`` is left out: an experiment should say what it ran on.
BACKEND_CHOICES = tuple(b for b in BACKENDS if b != "auto")


class WallClock(Callback):
    """Append ``time.perf_counter()`` at the end of every epoch to ``ends``."""

    def __init__(self, ends: list[float]) -> None:
        self.ends = ends

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())


class TestScoring(Callback):
    """Record the loss and accuracy on a held-out set after every epoch.

    Writes ``test_loss`` and ``test_acc`` into the epoch's row of
    ``net.history_``, so skorch's printed table shows them. A callback, not
    a validation split, so that the held-out set is the same fixed test set
    for every run and never takes examples from the training set.

    Parameters
    ----------
    X, y : torch.Tensor
        The held-out examples and their labels.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X = X
        self.y = y

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        # forward(training=False) puts the module in eval mode (ghost batch
        # norm then uses its running statistics, as at prediction time).
        logits = net.forward(self.X, training=False)
        target = torch.as_tensor(self.y).to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target.long())
        acc = (logits.argmax(dim=1) == target).double().mean()
        net.history.record("test_loss", float(loss))
        net.history.record("test_acc", float(acc))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in this process, then restore.

    The experiment models are so small that a thread pool costs more than it
    gains: one thread is several times faster than two on a 2-core machine
    that also runs other processes.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_limit(backend: str, max_workers: int | None) -> int | None:
    """The estimator's ``max_workers`` for an experiment on ``backend``.

    The schedules ask for up to ``final batch / initial batch`` workers (90
    for Inc. BS on the digits); on a machine's own cluster more worker
    processes than cores only compete for them, so a Dask backend is capped
    as an embedded cluster is (:func:`~adadamp.cluster.default_worker_limit`)
    unless ``max_workers`` says otherwise.
    """
    if max_workers is not None or backend == "local":
        return max_workers
    from ..cluster import default_worker_limit

    return default_worker_limit()


# What the tasks of an experiment's fits import on a worker.
WORKER_IMPORTS = (
    "adadamp.engines.decentralized",
    "adadamp.engines.centralized",
    "adadamp.experiments.models",
)


def build_an_optimizer() -> None:
    """Build one throw-away optimizer: a process's first costs about a second.

    (torch imports its compiler stack the first time an optimizer is built.)
    Left to the first fit, that second would count in that run's wall-clock only.
    """
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def freeze_what_is_held() -> None:
    """Collect garbage, then leave what this process holds now out of later full collections.

    A full collection scans every tracked object. In an experiment's process,
    which also runs the embedded cluster's scheduler and keeps every finished
    run's records, each took 145 to 229 ms (three per ``adadamp compare``)
    and landed in whichever run was training. Called before each run (and
    at the cluster's start), so that a run pays for collecting its own
    objects only. What is frozen lives until the process ends anyway.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def dask_client(backend: str, max_workers: int | None = None) -> Iterator[Any]:
    """A Dask client for the whole experiment, or ``None`` for ``backend="local"``.

    One cluster serves every run of an experiment: starting one per fit would
    add its start-up time to every run.
    """
    if backend == "local":
        freeze_what_is_held()
        yield None
        return
    from ..cluster import cluster_client

    limit = worker_limit(backend, max_workers)
    # Started with all its workers, so that no run pays for starting one: the
    # cluster's start is the experiment's, not a schedule's.
    with cluster_client(None, n_workers_hint=limit, max_workers=limit) as handle:
        # Each worker imports what the runs' tasks use (torch, the engines, the
        # experiment's models) and builds its first optimizer now: that too is
        # the cluster's start.
        # (LocalCluster returns once its workers have started.)
        for module in WORKER_IMPORTS:
            handle.client.run(importlib.import_module, module)
        handle.client.run(build_an_optimizer)
        handle.client.run(freeze_what_is_held)
        freeze_what_is_held()
        # Current for the experiment, so that Dask calls that look up the
        # client themselves (distributed.wait, futures) find this one.
        with handle.client.as_current():
            yield handle.client


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value
