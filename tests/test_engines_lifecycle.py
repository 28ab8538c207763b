"""What the Dask engines leave behind and how they survive losing a worker.

The first test starts its own cluster (``client=None``) and checks that
nothing outlives the fit; the others kill a worker process of a cluster of
their own in the middle of a fit.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import psutil
import pytest
import torch
from estimator_helpers import one_torch_thread, regression, updates  # noqa: F401
from skorch.callbacks import Callback
from torch import nn

from adadamp.cluster import current_client
from adadamp.dampers import GeoDamp
from adadamp.estimators import DaskRegressor
from adadamp.scaling import available_workers

# --------------------------------------------------------------------------- leaks


def _children() -> set[int]:
    """This process's descendants, except multiprocessing's resource tracker
    (started once per interpreter, meant to outlive every cluster)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                found.add(p.pid)
        except psutil.Error:  # it exited while we looked
            pass
    return found


def _listening() -> set[tuple[str, int]]:
    """The TCP addresses this process listens on."""
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


def test_embedded_cluster_leaves_no_process_or_port():
    assert current_client() is None, "a Dask client from another test is still the default"
    X, y = regression(n=128)
    children, listening = _children(), _listening()
    torch.manual_seed(0)
    # B = 32 then 64 with one worker per 32 examples: the embedded cluster
    # starts one worker process and asks for a second. Training does not wait
    # for it, so whether it joins the last updates depends on its start-up;
    # either way its process must end with the fit.
    est = DaskRegressor(
        nn.Linear(5, 1),
        batch_size=GeoDamp,
        batch_size__initial=32,
        batch_size__delay=1,
        batch_size__factor=2,
        grads_per_worker=32,
        max_workers=2,
        max_epochs=2,
        lr=0.05,
        backend="decentralized",
        client=None,
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)
    workers = updates(est, "workers")
    assert workers[:4] == [1] * 4 and set(workers[4:]) <= {1, 2}, workers
    assert est.history_[-1]["examples"] == 2 * len(X)
    # Closing is synchronous, but the OS may take a moment to reap a process.
    deadline = time.monotonic() + 10
    while (_children() - children or _listening() - listening) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children() - children == set(), "worker processes outlived the fit"
    assert _listening() - listening == set(), "ports still listen after the fit"
    assert current_client() is None


# --------------------------------------------------------------------------- lost workers


class SlowLinear(nn.Module):
    """A linear model whose forward pass sleeps, so that a fit lasts long enough to
    kill a worker in the middle of it."""

    def __init__(self, features: int = 5, delay: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.linear(x)


class EpochStarted(Callback):
    """Sets an event when epoch ``epoch`` (1-based) begins."""

    def __init__(self, epoch: int, event: threading.Event):
        self.epoch = epoch
        self.event = event

    def on_epoch_begin(self, net, **kwargs):
        if len(net.history) >= self.epoch:
            self.event.set()


KILL_N, KILL_BATCH, KILL_EPOCHS = 320, 32, 3


def _both_busy(client) -> bool:
    processing = client.processing()
    return len(processing) == 2 and all(processing.values())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["centralized", "decentralized"])
def test_fit_survives_a_killed_worker(fresh_dask_client, backend, caplog):
    client = fresh_dask_client
    X, y = regression(n=KILL_N)
    second_epoch = threading.Event()
    torch.manual_seed(0)
    est = DaskRegressor(
        SlowLinear(),
        batch_size=KILL_BATCH,
        max_epochs=KILL_EPOCHS,
        lr=0.05,
        optimizer=torch.optim.SGD,
        backend=backend,
        client=client,
        random_state=0,
        min_workers=2,
        max_workers=2,
        verbose=0,
        callbacks=[("started", EpochStarted(2, second_epoch))],
    )
    outcome: dict = {}

    def fit():
        try:
            est.fit(X, y)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    trainer = threading.Thread(target=fit, daemon=True)
    trainer.start()
    deadline = time.monotonic() + 120
    while not second_epoch.wait(0.2) and trainer.is_alive() and time.monotonic() < deadline:
        pass
    assert "error" not in outcome, outcome.get("error")
    assert second_epoch.is_set(), "the fit never reached its second epoch"
    # Kill only once both workers run the epoch's tasks, and a little later, so
    # that it lands among the updates rather than between them.
    while not _both_busy(client) and trainer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    pids = client.run(os.getpid)
    # The first worker hosts the parameter server's updates (centralized) and
    # rank 0, whose result ends the segment (decentralized): the harder case.
    victim = available_workers(client)[0]
    assert trainer.is_alive(), "the fit ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    # A rank of the decentralized engine that waits for a dead peer to join its
    # process group gives up after GROUP_TIMEOUT (60 s) only: allow for that.
    trainer.join(300)
    assert not trainer.is_alive(), "the fit did not return after a worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert victim not in available_workers(client), "the worker was not killed"
    if backend == "decentralized":
        assert "A worker was lost" in caplog.text  # the segment was restarted

    per_epoch = math.ceil(KILL_N / KILL_BATCH)
    planned = KILL_EPOCHS * per_epoch
    assert est.history_[-1]["model_updates"] == planned
    assert [len(epoch["batches"]) for epoch in est.history_] == [per_epoch] * KILL_EPOCHS
    # Every example of every epoch was used once: no update lost or repeated.
    assert [sum(b["train_batch_size"] for b in epoch["batches"]) for epoch in est.history_] == [
        KILL_N
    ] * KILL_EPOCHS
    assert len(updates(est, "train_loss")) == planned
    assert all(math.isfinite(loss) for loss in updates(est, "train_loss"))
    assert all(torch.isfinite(p).all() for p in est.module_.parameters())
