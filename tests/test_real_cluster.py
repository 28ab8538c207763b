"""The decentralized engine on a cluster of ``dask scheduler`` and ``dask worker`` processes.

The estimators reach these clusters by address, as a user's script would: no
cluster object, so nothing here can start or restart a worker for a fit.
The processes come from ``start_cli_cluster`` (``conftest.py``), which kills
them after the module and fails if any outlives it. Every fit runs in a
thread with a deadline, so that a fit that hangs fails its test instead of
the whole run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import sys
import threading
import time

import psutil
import pytest
import torch
from estimator_helpers import (  # noqa: F401 (one_torch_thread: autouse fixture)
    MLP,
    digits,
    one_torch_thread,
    regression,
    wait_until_workers_hold_model,
)
from skorch.callbacks import Callback
from torch import nn

from adadamp.dampers import AdaDamp
from adadamp.engines import _worker
from adadamp.estimators import DaskClassifier, DaskRegressor
from adadamp.scaling import available_workers

# --------------------------------------------------------------------------- helpers


def fit_within(est, X, y, seconds: float) -> tuple[BaseException | None, float]:
    """Fit in a thread; fail the test if it has not returned after ``seconds``.

    Returns the fit's exception (None if it returned) and its wall-clock seconds.
    """
    outcome: dict = {}

    def fit():
        try:
            est.fit(X, y)
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    began = time.monotonic()
    trainer = threading.Thread(target=fit, daemon=True)
    trainer.start()
    trainer.join(seconds)
    took = time.monotonic() - began
    assert not trainer.is_alive(), f"the fit had not returned after {seconds:g} s"
    return outcome.get("error"), took


def per_update(est, key: str) -> list[list]:
    """``key`` of every model update, one list per epoch (validation batches left out)."""
    return [
        [batch[key] for batch in epoch["batches"] if "workers" in batch] for epoch in est.history_
    ]


def undoes(first: dict, second: dict) -> bool:
    """Whether rescale ``second`` takes the worker count back to where ``first`` found it."""
    return second["from"] == first["to"] and second["to"] == first["from"]


def listening_ports() -> list[tuple[str, int]]:
    """The TCP addresses the calling process listens on (run on a worker by client.run)."""
    return [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]


def close_rendezvous(token: str) -> None:
    _worker.take_rendezvous(token).close()


class SlowLinear(nn.Module):
    """A linear model whose forward pass sleeps, so that a fit lasts a few seconds."""

    def __init__(self, features: int = 5, delay: float = 0.05):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.linear(x)


# --------------------------------------------------------------------------- adaptive dampers

LIVELOCK_SEEDS = (0, 1, 2, 3)
FIT_DEADLINE_S = 120


def worker_count_changes(workers: list[int]) -> list[tuple[int, int]]:
    """``(from, to)`` of every change of the worker count between two updates."""
    return [(a, b) for a, b in zip(workers, workers[1:]) if a != b]


# skorch's default rate (the batch size barely leaves 32, then 33, where one
# worker becomes two), and one at which the loss, and so the batch size, jumps
# back and forth across 32 within an epoch.
@pytest.mark.parametrize("lr", [0.01, 2.0])
@pytest.mark.parametrize("seed", LIVELOCK_SEEDS)
def test_adadamp_on_two_workers_does_not_livelock(cli_cluster, seed, lr):
    """AdaDamp's batch size wobbles around multiples of grads_per_worker; the
    worker count must not follow every wobble (nor stall the fit doing so)."""
    X, y = digits(300)
    torch.manual_seed(seed)
    est = DaskClassifier(
        MLP,
        batch_size=AdaDamp,
        backend="decentralized",
        client=cli_cluster.address,
        grads_per_worker=32,
        max_epochs=2,
        lr=lr,
        random_state=seed,
        verbose=0,
    )
    error, took = fit_within(est, X, y, FIT_DEADLINE_S)
    assert error is None, f"the fit raised {error!r}"
    assert len(est.history_) == 2
    rescales = [event for epoch in est.history_ for event in epoch["rescales"]]
    sizes = [size for epoch in per_update(est, "train_batch_size") for size in epoch]
    workers = [w for epoch in per_update(est, "workers") for w in epoch]
    context = f"seed {seed}, lr {lr}: rescales {rescales}, batch sizes {sizes}, workers {workers}"
    assert len(rescales) <= 2, f"too many rescales in {took:.1f} s; {context}"
    for first, second in zip(rescales, rescales[1:]):
        assert not undoes(first, second), f"a rescale undid the one before; {context}"
    # Each change of the worker count is a recorded rescale (none goes unaccounted).
    changes = worker_count_changes(workers)
    assert changes == [(r["from"], r["to"]) for r in rescales], context
    assert set(workers) <= {1, 2}, context
    assert est.history_[-1]["examples"] == 2 * len(X) * 4 // 5  # skorch holds out a fifth


# --------------------------------------------------------------------------- payload


_NET_SOURCE = """
from torch import nn

from adadamp.dampers import Constant

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x)

class Steady(Constant):
    pass
"""


@contextlib.contextmanager
def module_on_the_client(tmp_path, name: str):
    """A module ``name`` defining ``Net`` (a module) and ``Steady`` (a damper),
    importable in this process only, for the block."""
    (tmp_path / f"{name}.py").write_text(_NET_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        # cloudpickle pickles a class of an importable module by reference.
        assert module.Net.__module__ == name
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def _fit_net_within(cluster, net: type, seconds: float, batch_size=32):
    est = DaskClassifier(
        net,
        batch_size=batch_size,
        backend="decentralized",
        client=cluster.address,
        max_epochs=1,
        train_split=None,
        random_state=0,
        verbose=0,
    )
    return fit_within(est, *digits(100), seconds)


def test_payload_the_cluster_cannot_unpickle_fails_fast(cli_cluster, tmp_path):
    """A module class only the client can import: the fit raises, it does not wait forever."""
    name = f"only_on_the_client_{os.getpid()}"
    with module_on_the_client(tmp_path, name) as module:
        error, took = _fit_net_within(cli_cluster, module.Net, 30)
    assert error is not None, "the fit succeeded on workers that cannot import its module"
    message = "".join(f"{type(e).__name__}: {e}\n" for e in _chain(error))
    # The message says what failed and which class the cluster must import.
    assert "could not hold the fit's module" in message, message
    assert f"must be able to import {name}.Net" in message, message
    assert took < 30
    # The cluster is still usable afterwards.
    assert cli_cluster.client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3


def test_the_scheduler_need_not_import_the_users_classes(cli_cluster, tmp_path):
    """The payload and the ranks' start cross the scheduler sealed: only the
    workers unpickle the model and the damper."""
    name, path = f"on_the_workers_only_{os.getpid()}", str(tmp_path)
    client = cli_cluster.client
    with module_on_the_client(tmp_path, name) as module:
        # Lambdas: cloudpickle sends them by value (this test module is not
        # importable in the cluster's processes).
        client.run(lambda: sys.path.insert(0, path))
        try:
            assert not client.run_on_scheduler(lambda: importlib.util.find_spec(name) is not None)
            error, _ = _fit_net_within(cli_cluster, module.Net, 60, batch_size=module.Steady)
        finally:
            client.run(lambda: sys.path.remove(path))
            client.run(lambda: sys.modules.pop(name, None))
    assert error is None, f"the fit raised {error!r}"


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


# --------------------------------------------------------------------------- rendezvous


def test_rendezvous_listens_only_on_the_workers_address(cli_cluster):
    client = cli_cluster.client
    w0 = available_workers(client)[0]
    host, port = client.run(_worker.open_rendezvous, "tok", workers=[w0])[w0]
    try:
        assert host == "127.0.0.1"
        listening = client.run(listening_ports, workers=[w0])[w0]
        assert ("127.0.0.1", port) in listening, listening
        wildcard = [(ip, p) for ip, p in listening if p == port and ip in ("0.0.0.0", "::")]
        assert not wildcard, f"the rendezvous port also listens on {wildcard}"
    finally:
        client.run(close_rendezvous, "tok", workers=[w0])
    assert ("127.0.0.1", port) not in client.run(listening_ports, workers=[w0])[w0]


# --------------------------------------------------------------------------- joining workers


class AddWorkerAfterEpoch(Callback):
    """Starts one more CLI worker at the end of epoch ``epoch`` (1-based)."""

    def __init__(self, cluster, epoch: int = 1):
        self.cluster, self.epoch = cluster, epoch
        self.joined: str | None = None

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.joined = self.cluster.add_worker()
            # Used from the next epoch once it holds the model, whatever its start-up takes.
            wait_until_workers_hold_model(self.cluster.client, net.fit_id_, 2)


def test_workers_that_join_mid_fit_are_used(start_cli_cluster):
    cluster = start_cli_cluster(1)
    try:
        X, y = digits(256)
        adder = AddWorkerAfterEpoch(cluster, epoch=1)
        torch.manual_seed(0)
        est = DaskClassifier(
            MLP,
            batch_size=64,  # two workers' worth from the start
            grads_per_worker=32,
            backend="decentralized",
            client=cluster.address,
            max_epochs=6,
            train_split=None,
            random_state=0,
            verbose=0,
            callbacks=[("add_worker", adder)],
        )
        error, _ = fit_within(est, X, y, FIT_DEADLINE_S)
        assert error is None, f"the fit raised {error!r}"
        assert adder.joined is not None
        workers = per_update(est, "workers")
        assert set(workers[0]) == {1}, workers
        assert all(set(epoch) == {2} for epoch in workers[1:]), (
            f"the worker that joined after epoch 1 was not used: workers per update {workers}"
        )
        assert est.history_[-1]["examples"] == 6 * len(X)
    finally:
        cluster.close()


class AddWorkerAtFirstEpoch(Callback):
    """Starts one more CLI worker as the fit's first epoch begins (in a thread)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.thread: threading.Thread | None = None

    def on_epoch_begin(self, net, **kwargs):
        if self.thread is None:
            self.thread = threading.Thread(target=self.cluster.add_worker, daemon=True)
            self.thread.start()


def test_a_worker_that_joins_mid_epoch_is_used_without_stalling(start_cli_cluster):
    """Training goes on on the one worker while the second starts; once it holds
    the model, the segment stops at the next update and goes on with both."""
    cluster = start_cli_cluster(1)
    try:
        X, y = regression(n=1280)
        est = DaskRegressor(
            SlowLinear(delay=0.05),  # ~0.1 s per update: the epoch outlasts a worker's start
            batch_size=64,  # two workers' worth from the start
            grads_per_worker=32,
            backend="decentralized",
            client=cluster.address,
            max_epochs=12,
            optimizer=torch.optim.SGD,
            lr=0.01,
            random_state=0,
            verbose=0,
            callbacks=[("add_worker", AddWorkerAtFirstEpoch(cluster))],
        )
        error, _ = fit_within(est, X, y, FIT_DEADLINE_S)
        assert error is None, f"the fit raised {error!r}"
        workers = [w for epoch in per_update(est, "workers") for w in epoch]
        rescales = [event for epoch in est.history_ for event in epoch["rescales"]]
        # One change, from one worker to two, recorded; never back.
        assert worker_count_changes(workers) == [(1, 2)], workers
        assert [(r["from"], r["to"]) for r in rescales] == [(1, 2)], rescales
        # Training did not wait for the worker to start: updates ran on one meanwhile.
        switch = workers.index(2)
        assert switch > 0
        assert rescales[0]["update"] == switch
        assert rescales[0]["seconds"] < 5.0, rescales
        assert est.history_[-1]["examples"] == 12 * len(X)
    finally:
        cluster.close()


# --------------------------------------------------------------------------- lost rank 0


class KillRankZero(Callback):
    """Kills (SIGKILL) the first available worker as epoch ``epoch`` (1-based) begins,
    and stamps the time of the kill and of every epoch's end."""

    def __init__(self, client, epoch: int):
        self.client, self.epoch = client, epoch
        self.victim: str | None = None
        self.killed_at: float | None = None
        self.epoch_ends: list[float] = []

    def on_epoch_begin(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.victim = available_workers(self.client)[0]
            pid = self.client.run(os.getpid, workers=[self.victim])[self.victim]
            os.kill(pid, signal.SIGKILL)
            self.killed_at = time.monotonic()

    def on_epoch_end(self, net, **kwargs):
        self.epoch_ends.append(time.monotonic())


KILL_N, KILL_EPOCHS = 320, 3


@pytest.mark.parametrize("ranks", [2, 1])
def test_lost_rank_zero_recovers_quickly(start_cli_cluster, ranks):
    # No nanny: nothing restarts the killed worker. With two ranks the
    # survivor's failure ends the client's wait on the dead worker; with one,
    # the scheduler's list of workers does (a call to the dead worker would
    # wait out Dask's connect timeout, 30 s).
    cluster = start_cli_cluster(2, nanny=False)
    try:
        X, y = regression(n=KILL_N)
        killer = KillRankZero(cluster.client, epoch=2)
        torch.manual_seed(0)
        est = DaskRegressor(
            SlowLinear(),
            batch_size=32 * ranks,
            grads_per_worker=32,
            backend="decentralized",
            client=cluster.address,
            max_epochs=KILL_EPOCHS,
            lr=0.05,
            optimizer=torch.optim.SGD,
            random_state=0,
            verbose=0,
            callbacks=[("kill", killer)],
        )
        error, took = fit_within(est, X, y, 180)
        assert error is None, f"the fit raised {error!r}"
        assert killer.killed_at is not None, "the worker was never killed"
        assert killer.victim not in available_workers(cluster.client)
        workers = per_update(est, "workers")
        assert set(workers[0]) == {ranks}, workers
        assert all(set(epoch) == {1} for epoch in workers[1:]), workers
        assert est.history_[-1]["examples"] == KILL_EPOCHS * KILL_N
        assert [sum(e) for e in per_update(est, "train_batch_size")] == [KILL_N] * KILL_EPOCHS
        # Epoch 2 ran entirely after the kill: its end minus its updates' own
        # compute time bounds the stall the lost worker caused.
        epoch_2_end = killer.epoch_ends[1]
        computing = sum(per_update(est, "duration")[1])
        stall = epoch_2_end - killer.killed_at - computing
        assert stall < 15, (
            f"{stall:.1f} s passed between killing rank 0 and the updates resuming "
            f"(epoch 2 took {epoch_2_end - killer.killed_at:.1f} s, {computing:.1f} s computing)"
        )
    finally:
        cluster.close()
