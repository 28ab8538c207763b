"""The Dask engines against the local one, on a real cluster of worker processes.

One process ``LocalCluster`` serves the whole module (see ``conftest.py``);
the fits scale it themselves through ``min_workers``/``max_workers``. Tests
are ordered so that it mostly grows: starting a worker process takes seconds.
Worker failures and clusters started by the estimator itself are tested in
``test_engines_lifecycle.py``.
"""

from __future__ import annotations

import math
import time

import psutil
import pytest
import torch
from estimator_helpers import (
    MLP,
    digits,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    regression,
    updates,
    wait_until_workers_hold_model,
    weights,
)
from skorch.callbacks import Callback, EarlyStopping, LRScheduler
from torch.optim.lr_scheduler import StepLR

from adadamp import ConvergenceError
from adadamp.dampers import AdaDamp, GeoDamp, RadaDamp
from adadamp.engines._worker import data_arrivals, fits_held
from adadamp.engines.decentralized import DecentralizedEngine
from adadamp.estimators import DaskClassifier, DaskRegressor

DASK_BACKENDS = ("centralized", "decentralized")


def cluster_size(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def assert_weights_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float):
    """Every tensor within ``rtol`` of the reference, relative to its largest entry."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        err = float((a - e).abs().max() / e.abs().max())
        assert err <= rtol, f"relative difference {err:.3g} > {rtol}"


# --------------------------------------------------------------------------- bad input


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("backend", ["auto", *DASK_BACKENDS])
@pytest.mark.parametrize(
    "client, error, match",
    [
        (8786, TypeError, r"client must be None .* or a distributed\.Client; got int"),
        ("127.0.0.1", ValueError, r"client='127\.0\.0\.1' is not a scheduler address"),
        ("http://127.0.0.1:8786", ValueError, r"unknown scheme 'http'"),
        ("127.0.0.1:99999", ValueError, r"client='127\.0\.0\.1:99999' is not a scheduler address"),
        ("scheduler:8786 ", ValueError, r"is not a scheduler address"),
    ],
    ids=["int", "no-port", "http", "port-out-of-range", "trailing-space"],
)
def test_bad_client_fails_before_any_cluster_work(backend, client, error, match):
    X, y = regression(n=32)
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        batch_size=16,
        max_epochs=1,
        backend=backend,
        client=client,
        verbose=0,
    )
    children = _children()
    with pytest.raises(error, match=match):
        est.fit(X, y)
    # No worker process was started and nothing trained.
    assert _children() == children
    assert not any("model_updates" in row for row in est.history_)


@pytest.mark.parametrize("backend", ["dask", "Local", "", None, 1])
def test_bad_backend_fails_before_any_cluster_work(backend):
    X, y = regression(n=32)
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        batch_size=16,
        max_epochs=1,
        backend=backend,
        verbose=0,
    )
    children = _children()
    with pytest.raises(
        ValueError,
        match=r"backend must be one of \('auto', 'local', "
        r"'centralized', 'decentralized'\), an Engine subclass or an "
        r"Engine instance, got ",
    ):
        est.fit(X, y)
    assert _children() == children


# --------------------------------------------------------------------------- same weights

EQ_N, EQ_BATCH, EQ_EPOCHS = 240, 48, 2


def _digits_estimator(backend: str, client=None, workers: int = 1, **params) -> DaskClassifier:
    """The engines' comparison fit: SGD with momentum on the digits, seeded weights."""
    torch.manual_seed(0)  # the module's initial weights
    dask = {} if backend == "local" else {"min_workers": workers, "max_workers": workers}
    defaults = dict(
        batch_size=EQ_BATCH,
        max_epochs=EQ_EPOCHS,
        lr=0.1,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        train_split=None,
        random_state=7,
        verbose=0,
    )
    return DaskClassifier(
        MLP(features=64, hidden=16, out=10),
        backend=backend,
        client=client,
        **{**defaults, **dask, **params},
    )


def _equivalence_fit(backend: str, client=None, workers: int = 1) -> DaskClassifier:
    return _digits_estimator(backend, client, workers).fit(*digits(EQ_N))


@pytest.fixture(scope="module")
def local_reference() -> DaskClassifier:
    return _equivalence_fit("local")


# Worker counts ascend so that the shared cluster only grows.
@pytest.mark.parametrize(
    "workers, backend",
    [(p, b) for p in (1, 2, 3) for b in DASK_BACKENDS],
    ids=[f"{b}-{p}" for p in (1, 2, 3) for b in DASK_BACKENDS],
)
def test_dask_engines_match_local_weights(dask_client, local_reference, workers, backend):
    est = _equivalence_fit(backend, dask_client, workers)
    planned = EQ_EPOCHS * math.ceil(EQ_N / EQ_BATCH)
    assert est.history_[-1]["model_updates"] == planned
    assert updates(est, "workers") == [workers] * planned
    assert updates(est, "train_batch_size") == updates(local_reference, "train_batch_size")
    assert cluster_size(dask_client) == workers
    assert_weights_close(weights(est), weights(local_reference), rtol=1e-5)
    # The loss of every update too, not only where the run ended.
    assert updates(est, "train_loss") == pytest.approx(
        updates(local_reference, "train_loss"), rel=1e-5
    )


def _host_sums_opened(client) -> int:
    """How many shared-memory sums the cluster's workers have opened, in all."""
    from adadamp.engines import _host_sum

    return sum(client.run(lambda: _host_sum.opened).values())


def test_ranks_of_one_host_sum_through_shared_memory_unless_told_not_to(
    dask_client, local_reference
):
    from conftest import process_cluster

    from adadamp.engines._ranks import SHARED_MEMORY_ENV

    before = _host_sums_opened(dask_client)
    est = _equivalence_fit("decentralized", dask_client, 2)
    assert _host_sums_opened(dask_client) - before == 2  # one segment, two ranks
    cluster, client = process_cluster(2, env={SHARED_MEMORY_ENV: "0"})
    try:
        through_group = _equivalence_fit("decentralized", client, 2)
        assert _host_sums_opened(client) == 0
    finally:
        client.close()
        cluster.close()
    for fit in (est, through_group):
        assert updates(fit, "workers") == [2] * len(updates(local_reference, "workers"))
        assert_weights_close(weights(fit), weights(local_reference), rtol=1e-5)
    # Two ranks add two numbers, in either order the same: the same bits.
    assert_weights_close(weights(est), weights(through_group), rtol=0)


class WithUnusedParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(64, 10)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.used(x)


def test_a_lone_rank_steps_unused_parameters_as_several_ranks_do():
    # Several ranks reduce a buffer of zeros for a parameter the loss does not
    # use, so the optimizer steps it (weight decay here); a lone rank, whose
    # backward passes write fresh gradients, must give it zeros too, not None.
    est = DaskClassifier(
        WithUnusedParameter,
        batch_size=32,
        max_epochs=1,
        lr=0.1,
        optimizer=torch.optim.SGD,
        optimizer__weight_decay=0.5,
        train_split=None,
        random_state=0,
        verbose=0,
    ).fit(*digits(64))
    assert torch.allclose(est.module_.unused.detach(), torch.full((3,), (1 - 0.1 * 0.5) ** 2))


# --------------------------------------------------------------------------- workers follow B


class ClusterSizes(Callback):
    """Records how many workers the cluster has at the end of every epoch."""

    def __init__(self, client, sizes: list):
        self.client = client
        self.sizes = sizes

    def on_epoch_end(self, net, **kwargs):
        self.sizes.append(cluster_size(self.client))


GROW_N = 128  # epochs of 4, 2 and 1 updates at B = 32, 64, 128


@pytest.fixture(scope="module", params=DASK_BACKENDS)
def growing_fit(request, dask_client):
    """A fit whose batch size doubles every epoch, with one worker per 32 examples (<= 4)."""
    X, y = digits(GROW_N)
    sizes: list[int] = []
    torch.manual_seed(0)
    est = DaskClassifier(
        MLP,
        module__hidden=16,
        batch_size=GeoDamp,
        batch_size__initial=32,
        batch_size__delay=1,
        batch_size__factor=2,
        grads_per_worker=32,
        max_workers=4,
        max_epochs=3,
        lr=0.05,
        train_split=None,
        backend=request.param,
        client=dask_client,
        random_state=0,
        callbacks=[("cluster_sizes", ClusterSizes(dask_client, sizes))],
        verbose=0,
    )
    est.fit(X, y)  # from whatever size an earlier test left: the first epoch scales to 1
    return est, sizes


def test_worker_count_follows_batch_size(dask_client, growing_fit):
    est, sizes = growing_fit
    per_epoch = [[b["workers"] for b in epoch["batches"]] for epoch in est.history_]
    assert per_epoch == [[1] * 4, [2] * 2, [4]]
    assert updates(est, "train_batch_size") == [32] * 4 + [64] * 2 + [128]
    assert [epoch["workers"] for epoch in est.history_] == [1, 2, 4]
    # The cluster grew with the schedule, ahead of it (workers asked for before
    # the epoch that needs them), and never below what the fit found.
    assert sizes == sorted(sizes) and sizes[-1] == 4
    assert all(size >= used for size, used in zip(sizes, [1, 2, 4]))
    assert cluster_size(dask_client) == 4
    # Both rescales are recorded, with the seconds training stalled for them.
    rescales = [r for epoch in est.history_ for r in epoch["rescales"]]
    assert [(r["update"], r["from"], r["to"]) for r in rescales] == [(4, 1, 2), (6, 2, 4)]
    assert all(r["seconds"] >= 0 for r in rescales)


def test_training_set_reaches_each_worker_once_per_fit(dask_client, growing_fit):
    est, _ = growing_fit
    assert isinstance(est.fit_id_, str)
    # Every worker trained in the last epoch (4 workers, 4 slices): each got the
    # data once over the three epochs and the two rescalings.
    arrivals = dask_client.run(data_arrivals, est.fit_id_)
    assert len(arrivals) == 4
    assert set(arrivals.values()) == {1}, arrivals


def _scheduler_keys(dask_scheduler) -> list[str]:
    return [str(key) for key in dask_scheduler.tasks]


def test_a_finished_fit_leaves_nothing_of_it_on_the_cluster(dask_client, growing_fit):
    est, _ = growing_fit
    # Not the payload's name on the scheduler (it would hold the training set
    # there for good), nor its tasks, nor a worker's model of it.

    def left() -> tuple[list, list, dict]:
        names = [name for name in dask_client.list_datasets() if est.fit_id_ in name]
        keys = dask_client.run_on_scheduler(_scheduler_keys)
        models = {w: fits for w, fits in dask_client.run(fits_held).items() if fits}
        return names, [key for key in keys if est.fit_id_ in key], models

    # Names are unpublished, futures let go and workers forget in messages
    # the fit does not wait for.
    deadline = time.monotonic() + 10
    while any(left()):
        assert time.monotonic() < deadline, left()
        time.sleep(0.1)


def test_local_fit_has_no_fit_id(local_reference):
    assert local_reference.fit_id_ is None


# --------------------------------------------------------------------------- adaptive dampers


DAMPERS = {
    "adadamp-dwell": dict(
        batch_size=AdaDamp,
        batch_size__initial=16,
        batch_size__dwell=3,
        batch_size__loss_fraction=0.5,
    ),
    "radadamp-loss": dict(batch_size=RadaDamp, batch_size__initial=16, batch_size__rho=0.5),
    "radadamp-grad": dict(
        batch_size=RadaDamp,
        batch_size__initial=16,
        batch_size__rho=0.5,
        batch_size__signal="grad_norm",
    ),
}


def _adaptive_fit(params: dict, backend: str, client=None) -> DaskRegressor:
    X, y = regression(n=192, features=5)
    torch.manual_seed(1)
    module = MLP(features=5, hidden=16, out=1)
    est = DaskRegressor(
        module,
        **params,
        max_epochs=3,
        lr=0.05,
        optimizer=torch.optim.SGD,
        backend=backend,
        client=client,
        random_state=3,
        min_workers=2,
        max_workers=2,
        verbose=0,
    )
    return est.fit(X, y)


@pytest.mark.parametrize("name", DAMPERS)
def test_adaptive_damper_agrees_across_ranks(dask_client, name):
    # An adaptive fit trains on the workers present while more start, and
    # this one is over before a new worker process is up: start them first.
    dask_client.cluster.scale(2)
    dask_client.wait_for_workers(2)
    local = _adaptive_fit(DAMPERS[name], "local")
    dist = _adaptive_fit(DAMPERS[name], "decentralized", dask_client)
    sizes = updates(local, "train_batch_size")
    assert len(set(sizes)) > 2, "the damper did not adapt: the test would prove nothing"
    assert updates(dist, "train_batch_size") == sizes
    assert updates(dist, "damping") == pytest.approx(updates(local, "damping"), rel=1e-4)
    assert updates(dist, "train_loss") == pytest.approx(updates(local, "train_loss"), rel=1e-4)
    assert set(updates(dist, "workers")) == {2}
    assert_weights_close(weights(dist), weights(local), rtol=1e-4)


# --------------------------------------------------------------------------- divergence


def _diverging_fit(backend: str, client=None) -> tuple[DaskRegressor, ConvergenceError]:
    X, y = regression(n=64)
    y = y * 1e6  # targets far from the scale of the initial predictions
    torch.manual_seed(0)
    est = DaskRegressor(
        MLP(features=5, out=1),
        lr=10.0,
        max_epochs=50,
        batch_size=16,
        backend=backend,
        client=client,
        random_state=0,
        min_workers=2,
        max_workers=2,
        verbose=0,
    )
    with pytest.raises(ConvergenceError, match=r"model update \d+") as info:
        est.fit(X, y)
    return est, info.value


@pytest.mark.parametrize("backend", DASK_BACKENDS)
def test_convergence_error_reaches_caller_and_leaves_no_task_running(dask_client, backend):
    _, local_error = _diverging_fit("local")
    _, error = _diverging_fit(backend, dask_client)
    # The same update diverged, and the message says so as the local engine's does.
    assert str(error) == str(local_error)
    deadline = time.monotonic() + 10
    while any(dask_client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(dask_client.processing().values()), dask_client.processing()


# --------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decentralized_fit_on_cuda_keeps_the_module_on_the_gpu():
    X, y = digits(256)
    torch.manual_seed(0)
    est = DaskClassifier(
        MLP,
        module__hidden=16,
        batch_size=32,
        max_epochs=3,
        lr=0.1,
        train_split=None,
        device="cuda",
        backend="decentralized",
        client=None,
        max_workers=1,
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)
    assert all(p.device.type == "cuda" for p in est.module_.parameters())
    assert set(updates(est, "workers")) == {1}
    assert est.history_[-1]["model_updates"] == 3 * 8
    losses = [epoch["train_loss"] for epoch in est.history_]
    assert losses[-1] < losses[0]
    assert est.predict(X).shape == (256,)


# --------------------------------------------------------------------------- lifecycle


def test_rank_0s_store_alone_holds_and_closes_its_listening_socket():
    """The store closes its socket's descriptor itself: the socket object may not hold it
    too, or it closes the number again later, whatever file has it by then."""
    import gc
    import socket
    import types

    from adadamp.engines import _ranks, _worker

    worker = types.SimpleNamespace(address="tcp://127.0.0.1:1")
    host, port = _worker.open_rendezvous("fit-store-0", worker)
    bound = _worker._RENDEZVOUS["fit-store-0"]
    start = types.SimpleNamespace(rendezvous=(host, port), token="fit-store-0")
    group = _ranks._process_group(start, 0, 1, "cpu")
    assert group.size() == 1
    assert bound.fileno() == -1, "the socket object still holds the store's descriptor"
    del group
    gc.collect()
    # The store closed the socket when it went: nothing listens there any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()


def _segment_token(fit_id: str) -> str | None:
    from adadamp.engines import _ranks

    segment = _ranks._SEGMENTS.get(fit_id)
    return None if segment is None else segment.token


class SegmentTokens(Callback):
    """Records, per epoch, the segment each worker runs for the fit."""

    def __init__(self, client, tokens: list):
        self.client, self.tokens = client, tokens

    def on_epoch_end(self, net, **kwargs):
        self.tokens.append(set(self.client.run(_segment_token, net.fit_id_).values()))


def test_process_groups_live_across_epochs_at_one_worker_count(dask_client):
    X, y = digits(128)
    tokens: list = []
    est = DaskClassifier(MLP, batch_size=64, grads_per_worker=32, min_workers=2, max_workers=2,
                         max_epochs=4, lr=0.1, backend="decentralized", client=dask_client,
                         train_split=None, random_state=0, verbose=0,
                         callbacks=[("tokens", SegmentTokens(dask_client, tokens))])  # fmt: skip
    est.fit(X, y)
    assert updates(est, "workers") == [2] * 8
    # One segment, so one process group, for the whole fit: the same token on
    # both workers after every epoch.
    (first,) = tokens[0] - {None}
    assert all(epoch - {None} == {first} for epoch in tokens), tokens
    assert [r for epoch in est.history_ for r in epoch["rescales"]] == []


class HalveFirstLayer(Callback):
    """Halves the first layer's weights as epoch ``epoch`` (from 1) begins or ends.

    A change of the client's module that no rank can foresee.
    """

    def __init__(self, epoch: int, at: str):
        self.epoch, self.at = epoch, at

    def _halve(self, net, at: str) -> None:
        if at == self.at and len(net.history) == self.epoch:
            with torch.no_grad():
                next(net.module_.parameters()).mul_(0.5)

    def on_epoch_begin(self, net, **kwargs):
        self._halve(net, "begin")

    def on_epoch_end(self, net, **kwargs):
        self._halve(net, "end")


def _epoch_end_changes_fit(backend: str, client=None) -> DaskClassifier:
    # The rate changes after the second epoch, the weights after the third;
    # nothing changes after the first.
    callbacks = [
        ("step", LRScheduler(StepLR, step_size=2, gamma=0.5)),
        ("halve", HalveFirstLayer(3, "end")),
    ]
    est = _digits_estimator(backend, client, 2, max_epochs=4, callbacks=callbacks)
    return est.fit(*digits(EQ_N))


@pytest.mark.parametrize("backend", DASK_BACKENDS)
def test_changes_made_at_an_epoch_end_apply_from_the_next_update(dask_client, backend):
    # The decentralized ranks run ahead into the next epoch while the client
    # runs its callbacks: a change must still apply from that epoch's first update.
    local = _epoch_end_changes_fit("local")
    est = _epoch_end_changes_fit(backend, dask_client)
    assert updates(est, "workers") == [2] * len(updates(local, "workers"))
    assert updates(est, "lr") == pytest.approx(updates(local, "lr"), rel=1e-6)
    assert sorted(set(updates(est, "lr"))) == pytest.approx([0.05, 0.1])
    assert updates(est, "train_loss") == pytest.approx(updates(local, "train_loss"), rel=1e-5)
    assert_weights_close(weights(est), weights(local), rtol=1e-5)


def _early_stopped_fit(backend: str, client=None) -> DaskClassifier:
    # No epoch can improve the loss by 99%: the fit stops after its patience.
    stop = EarlyStopping(monitor="train_loss", patience=1, threshold=0.99, sink=lambda *a: None)
    est = _digits_estimator(backend, client, 1, max_epochs=8, callbacks=[("stop", stop)])
    return est.fit(*digits(EQ_N))


def test_an_early_stop_ends_the_ranks_that_ran_ahead(dask_client):
    local = _early_stopped_fit("local")
    est = _early_stopped_fit("decentralized", dask_client)
    assert len(est.history_) == len(local.history_) < 8
    assert_weights_close(weights(est), weights(local), rtol=1e-5)
    # The ranks were into the next epoch when the client stopped: they end.
    deadline = time.monotonic() + 10
    while any(dask_client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(dask_client.processing().values()), dask_client.processing()


def _resumed_fit(backend: str, client=None) -> DaskClassifier:
    # The weights change as the first epoch begins, after the engine started.
    est = _digits_estimator(backend, client, 1, callbacks=[("halve", HalveFirstLayer(1, "begin"))])
    X, y = digits(EQ_N)
    for _ in range(2):
        est.partial_fit(X, y, epochs=1)
    return est


def test_a_fit_starts_from_the_client_state_its_callbacks_and_optimizer_left(dask_client):
    # A fit's first segment skips sending state that the workers' models
    # already hold: not when a callback changed the weights after the
    # payload left, nor when the optimizer carries momentum from an earlier fit.
    local = _resumed_fit("local")
    est = _resumed_fit("decentralized", dask_client)
    assert updates(est, "train_loss") == pytest.approx(updates(local, "train_loss"), rel=1e-5)
    assert_weights_close(weights(est), weights(local), rtol=1e-5)


class RequestedWorkers(Callback):
    def __init__(self, client, requested: list):
        self.client, self.requested = client, requested

    def on_epoch_end(self, net, **kwargs):
        # Asked for: in the cluster's spec (``requested`` lists only started workers).
        self.requested.append(len(self.client.cluster.worker_spec))
        if len(self.requested) == 3:
            # The fourth epoch needs the worker asked for ahead: a real epoch
            # would last long enough for it to start; this one waits for it.
            wait_until_workers_hold_model(self.client, net.fit_id_, 2)


def test_workers_are_asked_for_before_a_planned_schedule_needs_them(dask_client):
    dask_client.cluster.scale(1)
    dask_client.wait_for_workers(1)
    while cluster_size(dask_client) != 1:
        time.sleep(0.05)
    X, y = digits(128)
    requested: list = []
    est = DaskClassifier(
        MLP,
        batch_size=GeoDamp,
        batch_size__initial=32,
        batch_size__delay=3,
        batch_size__factor=2,
        grads_per_worker=32,
        max_workers=2,
        max_epochs=4,
        lr=0.1,
        backend="decentralized",
        client=dask_client,
        train_split=None,
        random_state=0,
        verbose=0,
        callbacks=[("requested", RequestedWorkers(dask_client, requested))],
    )
    est.fit(X, y)
    assert [epoch["workers"] for epoch in est.history_] == [1, 1, 1, 2]
    # The second worker was asked for at least one epoch before the fourth epoch needed it.
    assert requested[2] == 2, requested


class CountingPlans(DecentralizedEngine):
    """The decentralized engine, counting how often it plans the schedule."""

    def __init__(self) -> None:
        super().__init__()
        self.plans = 0

    def planned_workers(self, *args, **kwargs):
        self.plans += 1
        return super().planned_workers(*args, **kwargs)


def test_a_planned_schedule_is_planned_once_per_fit(dask_client):
    # Planning the rest of the fit at every epoch made the client's work grow
    # with the square of the fit's length.
    X, y = digits(128)
    engine = CountingPlans()
    est = DaskClassifier(
        MLP,
        batch_size=GeoDamp,
        batch_size__initial=32,
        batch_size__delay=2,
        batch_size__factor=2,
        max_epochs=6,
        lr=0.1,
        backend=engine,
        client=dask_client,
        min_workers=1,
        max_workers=1,
        train_split=None,
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)
    assert len(est.history_) == 6
    assert engine.plans == 1


def test_the_plan_reaches_as_far_as_the_horizon_and_keeps_the_most_workers_ahead():
    from adadamp.engines._dask import _Plan

    planned = [(1, 32), (1, 32), (2, 64), (1, 16), (3, 96), (1, 8)]
    plan = _Plan.of(10, planned)
    assert plan.most_workers_from == [3, 3, 3, 3, 3, 1]
    for at in range(len(planned)):
        for horizon in (1, 32, 33, 64, 100, 1000):
            # The first update from ``at`` by which ``horizon`` examples are used.
            used, expected = 0, len(planned) - 1
            for i in range(at, len(planned)):
                used += planned[i][1]
                if used >= horizon:
                    expected = i
                    break
            assert plan.reach(at, horizon) == expected, (at, horizon)


def test_worker_count_rule():
    from adadamp.scaling import WorkerCountRule

    planned = WorkerCountRule(2, immediate=True)
    assert not planned.changes(2) and planned.changes(3)
    noisy = WorkerCountRule(2, patience=3)
    assert not noisy.changes(4)  # twice the count is not yet far
    assert noisy.changes(5)  # more than twice is
    noisy = WorkerCountRule(2, patience=3)
    assert [noisy.changes(3) for _ in range(3)] == [False, False, True]
    assert not noisy.changes(2) and not noisy.changes(3)  # back at 2: the streak restarts
    assert not WorkerCountRule(4, patience=3).changes(2)
    assert WorkerCountRule(4, patience=3).changes(1)
