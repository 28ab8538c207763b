"""The Dask engines on a cluster as users run one: `dask scheduler` and `dask worker`
processes started here on 127.0.0.1, reached by address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from distributed import Client
from estimator_helpers import MLP, digits, one_torch_thread  # noqa: F401
from skorch.callbacks import Callback

from adadamp.dampers import AdaDamp
from adadamp.engines import _worker
from adadamp.estimators import DaskClassifier
from adadamp.scaling import available_workers

DASK = str(Path(sys.executable).parent / "dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliCluster:
    """A scheduler and workers as separate `dask` processes, cleaned up on close."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        # The processes see the installed packages and the tests' folder (the
        # models and helpers the tests fit), as a user's workers see the
        # user's code; nothing a test adds to this process's sys.path.
        self.env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        self.procs: list[subprocess.Popen] = []
        self._start("scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard")
        self.client = Client(self.address, timeout=60, set_as_default=False)

    def _start(self, *args: str) -> None:
        self.procs.append(
            subprocess.Popen(
                [DASK, *args],
                cwd=self.cwd,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def add_worker(self, wait: bool = True) -> None:
        have = len(available_workers(self.client))
        self._start(
            "worker", self.address, "--nthreads", "1", "--nworkers", "1",
            "--host", "127.0.0.1", "--no-dashboard",
        )  # fmt: skip
        if wait:
            self.client.wait_for_workers(have + 1, timeout=60)

    def close(self) -> None:
        self.client.close()
        for proc in reversed(self.procs):
            for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(timeout=30)


@pytest.fixture
def cli_cluster(tmp_path_factory):
    cluster = CliCluster(tmp_path_factory.mktemp("cluster-cwd"))
    yield cluster
    pids = [p.pid for p in cluster.procs]
    cluster.close()
    assert not [pid for pid in pids if psutil.pid_exists(pid) and
                psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip


def _fit_within(est, X, y, seconds: float):
    """Fit in a thread; fail (instead of hanging the suite) if it takes too long."""
    outcome: dict = {}

    def run():
        try:
            est.fit(X, y)
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the fit did not end within {seconds} s"
    return outcome.get("error"), time.monotonic() - began


def test_a_module_the_cluster_cannot_unpickle_fails_at_once(cli_cluster, tmp_path, monkeypatch):
    cli_cluster.add_worker()
    (tmp_path / "only_here.py").write_text(
        "import torch\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.out = torch.nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.out(x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here

    X, y = digits(100)
    est = DaskClassifier(only_here.Net, backend="decentralized", client=cli_cluster.address,
                         max_epochs=1, train_split=None, verbose=0)  # fmt: skip
    error, took = _fit_within(est, X, y, 60)
    assert error is not None
    assert took < 30
    assert "could not hold the fit's module" in str(error)
    assert "must be able to import only_here.Net" in str(error)


def test_adaptive_batch_sizes_do_not_flap_between_worker_counts(cli_cluster):
    cli_cluster.add_worker()
    cli_cluster.add_worker()
    X, y = digits(300)
    for seed in range(4):
        est = DaskClassifier(MLP, batch_size=AdaDamp, backend="decentralized",
                             client=cli_cluster.address, grads_per_worker=32, max_epochs=2,
                             lr=0.1, train_split=None, random_state=seed, verbose=0)  # fmt: skip
        error, _ = _fit_within(est, X, y, 120)
        assert error is None, error
        rescales = [r for epoch in est.history_ for r in epoch["rescales"]]
        assert len(rescales) <= 2, rescales
        # Never back and forth: no rescale undoes the one before it.
        for before, after in zip(rescales, rescales[1:]):
            assert (before["from"], before["to"]) != (after["to"], after["from"]), rescales
        assert est.history_[-1]["examples"] == 2 * len(X)


class StartWorkerAfterEpoch(Callback):
    def __init__(self, cluster: CliCluster, epoch: int):
        self.cluster, self.epoch = cluster, epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.cluster.add_worker()


def test_workers_that_join_mid_fit_are_used(cli_cluster):
    cli_cluster.add_worker()
    X, y = digits(256)
    torch.manual_seed(0)
    est = DaskClassifier(MLP, batch_size=64, grads_per_worker=32, backend="decentralized",
                         client=cli_cluster.address, max_epochs=4, lr=0.1, train_split=None,
                         callbacks=[("grow", StartWorkerAfterEpoch(cli_cluster, 1))],
                         verbose=0)  # fmt: skip
    error, _ = _fit_within(est, X, y, 180)
    assert error is None, error
    workers = [{u["workers"] for u in epoch["batches"]} for epoch in est.history_]
    # Two wanted from the start; one there until the second joined after epoch 1.
    assert workers[0] == {1}
    assert workers[-1] == {2}
    assert est.history_[-1]["examples"] == 4 * len(X)


def _listening_ports() -> list[tuple[str, int]]:
    conns = psutil.Process().net_connections(kind="tcp")
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def _close_rendezvous(token: str) -> None:
    _worker.take_rendezvous(token).close()


def test_the_rendezvous_listens_on_the_workers_address_only(cli_cluster):
    cli_cluster.add_worker()
    (w0,) = available_workers(cli_cluster.client)
    client = cli_cluster.client
    host, port = client.submit(_worker.open_rendezvous, "tok", workers=[w0], pure=False).result()
    assert host == "127.0.0.1"
    listening = client.run(_listening_ports, workers=[w0])[w0]
    on_port = {ip for ip, p in listening if p == port}
    assert on_port == {"127.0.0.1"}, listening
    client.run(_close_rendezvous, "tok", workers=[w0])
    assert port not in {p for _, p in client.run(_listening_ports, workers=[w0])[w0]}
