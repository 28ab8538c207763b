"""Resolving the ``client`` parameter and scaling clusters, on real LocalClusters.

The tests that check an embedded cluster leaves nothing behind come first:
they compare the process's threads and child processes before and after, so
they should run before this module's shared clusters start.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import numpy as np
import psutil
import pytest
import torch
from distributed import Client, LocalCluster

from adadamp.cluster import ClusterHandle, cluster_client, current_client, validate_client
from adadamp.scaling import WorkerScaler, _address_key, available_workers


def _worker_count(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _children() -> set[int]:
    """This process's descendants, except multiprocessing's resource tracker:
    it is started once per interpreter by the first spawned process and is
    meant to outlive every pool and cluster."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(_cmdline(p))
    }


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:  # it exited while we looked
        return []


def _threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.ident is not None}


def _accepts_connections(address: str) -> bool:
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _assert_left_nothing(children_before: set[int], threads_before: set[int], address: str):
    # Closing is synchronous, but a worker process may take a moment to be
    # reaped and a loop thread to finish; a leak would stay, so poll briefly.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not (_children() - children_before) and not (_threads() - threads_before):
            break
        time.sleep(0.1)
    assert _children() - children_before == set(), "worker processes outlived the cluster"
    new_threads = [t.name for t in threading.enumerate() if t.ident not in threads_before]
    assert new_threads == [], "threads outlived the cluster"
    assert not _accepts_connections(address), "the scheduler port still accepts connections"


# --- embedded clusters (worker processes) -----------------------------------


def _samples_profiles(dask_worker) -> bool:
    """Whether a Dask worker runs its statistical profiler (a ``client.run`` function)."""
    return "profile" in dask_worker.periodic_callbacks


def test_none_without_client_starts_embedded_cluster_and_closes_it():
    assert current_client() is None, "a default Dask client from another test is still open"
    children, threads = _children(), _threads()
    with cluster_client(None, n_workers_hint=1) as handle:
        assert handle.embedded
        assert handle.can_scale
        assert handle.client.status == "running"
        assert _worker_count(handle.client) == 1
        assert handle.cluster.processes
        assert len(_children() - children) >= 1  # a real worker process
        # No dashboard; the scheduler's HTTP routes on a free local port.
        http = handle.cluster.scheduler.http_server
        assert (http.address, http.port != 8787) == ("127.0.0.1", True)
        address = handle.client.scheduler.address
        assert address.startswith("tcp://127.0.0.1:")
        assert _accepts_connections(address)
    assert handle.client.status == "closed"
    assert current_client() is None, "the embedded client is still the current client"
    _assert_left_nothing(children, threads, address)


def test_embedded_cluster_scales_and_closes_on_error():
    children, threads = _children(), _threads()
    with pytest.raises(RuntimeError, match="fit failed"):
        with cluster_client(None, max_workers=2) as handle:
            assert handle.max_workers == 2
            address = handle.client.scheduler.address
            scaler = WorkerScaler(handle, timeout=30)
            assert scaler.n_workers == 1
            assert scaler.scale_to(2) == 2
            assert _worker_count(handle.client) == 2
            assert len(scaler.workers()) == 2
            # Nobody can look at profiles of an embedded cluster: its
            # workers, those started by scaling too, do not sample them.
            assert handle.client.run(_samples_profiles) == dict.fromkeys(scaler.workers(), False)
            assert scaler.scale_to(1) == 1
            assert _worker_count(handle.client) == 1
            assert scaler.n_workers == 1
            raise RuntimeError("fit failed")
    _assert_left_nothing(children, threads, address)


# --- validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        None,
        "tcp://127.0.0.1:8786",
        "127.0.0.1:8786",
        "tls://scheduler.example:8786",
        "tcp://[::1]:8786",
    ],
)
def test_validate_client_accepts(client):
    validate_client(client)


@pytest.mark.parametrize("client", [3, ["tcp://127.0.0.1:8786"], 1.5, b"tcp://127.0.0.1:8786"])
def test_validate_client_rejects_other_types(client):
    with pytest.raises(TypeError, match=r"client must be None .* address .* distributed\.Client"):
        validate_client(client)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "not an address",
        "127.0.0.1",  # no port, no scheme
        "http://127.0.0.1:8786",  # not a Dask scheme
        "tcp://",
        "tcp://127.0.0.1:99999",
        "tcp://127.0.0.1:port",
        " tcp://127.0.0.1:8786",
        "tcp//127.0.0.1:8786",  # the scheme's separator mistyped
        "tcp:/127.0.0.1:8786",
        "tcp://bad_host!:8786",
        "tcp://-leading-hyphen:8786",
    ],
)
def test_validate_client_rejects_bad_addresses(address):
    with pytest.raises(ValueError, match="client=.* is not a scheduler address"):
        validate_client(address)


def test_cluster_client_checks_parameters_before_cluster_work():
    children = _children()
    with pytest.raises(TypeError, match="client must be"):
        with cluster_client(8786):
            pass
    with pytest.raises(ValueError, match="n_workers_hint"):
        with cluster_client(None, n_workers_hint=0):
            pass
    with pytest.raises(ValueError, match="max_workers"):
        with cluster_client(None, max_workers=True):
            pass
    with pytest.raises(ValueError, match="device="):
        with cluster_client(None, device="not-a-device"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            with cluster_client(None, device="cuda"):
                pass
    assert _children() - children == set()


@pytest.mark.parametrize("address", ["tcp//127.0.0.1:8786", "tls:/scheduler:8786"])
def test_a_mistyped_scheme_separator_gets_the_fix(address):
    fixed = address.replace("//", "://") if "//" in address else address.replace(":/", "://")
    with pytest.raises(ValueError, match=f"did you mean '{re.escape(fixed)}'"):
        validate_client(address)


def test_estimator_refuses_a_malformed_address_before_any_cluster_work():
    from adadamp.estimators import DaskClassifier

    children = _children()
    began = time.monotonic()
    est = DaskClassifier(
        torch.nn.Linear,
        module__in_features=4,
        module__out_features=2,
        client="tcp//127.0.0.1:8786",
        max_epochs=1,
        verbose=0,
    )
    with pytest.raises(ValueError, match="client='tcp//127.0.0.1:8786' is not a scheduler address"):
        est.fit(np.zeros((8, 4), dtype="float32"), np.zeros(8, dtype="int64"))
    assert time.monotonic() - began < 5
    assert _children() - children == set()


def test_nobody_at_the_address_fails_within_dasks_connect_timeout():
    import dask

    from adadamp.estimators import DaskClassifier

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    est = DaskClassifier(
        torch.nn.Linear,
        module__in_features=4,
        module__out_features=2,
        client=f"tcp://127.0.0.1:{port}",
        max_epochs=1,
        verbose=0,
    )
    began = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        with pytest.raises(OSError) as info:
            est.fit(np.zeros((8, 4), dtype="float32"), np.zeros(8, dtype="int64"))
    assert time.monotonic() - began < 15
    message = str(info.value)
    assert f"client='tcp://127.0.0.1:{port}'" in message and "within 2 s" in message
    assert f"dask scheduler --host 127.0.0.1 --port {port}" in message
    assert f"dask worker tcp://127.0.0.1:{port}" in message


def test_unreachable_address_raises_oserror_naming_client():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError, match=r"client='tcp://127\.0\.0\.1:\d+'"):
        with cluster_client(f"tcp://127.0.0.1:{port}", connect_timeout=1):
            pass


# --- shared in-process clusters ---------------------------------------------


class CountingCluster(LocalCluster):
    """A LocalCluster that counts calls to ``scale``."""

    scale_calls = 0

    def scale(self, n=0, memory=None, cores=None):
        self.scale_calls += 1
        return super().scale(n, memory=memory, cores=cores)


class StuckCluster(LocalCluster):
    """A LocalCluster whose ``scale`` never adds a worker."""

    def scale(self, n=0, memory=None, cores=None):
        # Shrinking still works: closing scales to 0, and a worker left running
        # makes the close wait on it (seconds on a busy machine).
        if n < len(self.worker_spec):
            super().scale(n, memory=memory, cores=cores)


def _inprocess(cls=LocalCluster):
    # In-process workers start in milliseconds; tcp, so that a second client
    # can connect by address as it would to a remote scheduler.
    return cls(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )


@pytest.fixture(scope="module")
def shared():
    with _inprocess(CountingCluster) as cluster:
        # Not the default client: the tests of client=None decide themselves
        # whether a current client exists.
        with Client(cluster, set_as_default=False) as client:
            yield client


@pytest.fixture
def client(shared):
    """The shared client, with its cluster back at one worker afterwards."""
    yield shared
    if _worker_count(shared) != 1:
        shared.cluster.scale(1)
        deadline = time.monotonic() + 10
        while _worker_count(shared) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)


def test_validate_client_accepts_client_and_hints_at_cluster_objects(client):
    validate_client(client)
    with pytest.raises(TypeError, match=r"pass distributed\.Client\(cluster\)"):
        validate_client(client.cluster)


def test_none_uses_current_client_and_leaves_it_open(client):
    with Client(client.cluster) as current:  # the default client while open
        with cluster_client(None) as handle:
            assert handle.client is current
            assert not handle.embedded
        assert current.status == "running"
    assert client.status == "running"


def test_client_is_used_and_never_closed(client):
    with pytest.raises(KeyError):
        with cluster_client(client, max_workers=3) as handle:
            assert handle.client is client
            assert not handle.embedded
            assert handle.max_workers == 3
            raise KeyError("fails inside the block")
    assert client.status == "running"
    assert _worker_count(client) == 1


def test_address_connects_and_leaves_cluster_running(client):
    address = client.scheduler.address
    with cluster_client(address) as handle:
        assert handle.client is not client
        assert not handle.embedded
        assert handle.client.scheduler.address == address
        assert available_workers(handle.client) == available_workers(client)
        assert handle.client.submit(sum, [1, 2]).result() == 3
    assert handle.client.status == "closed"
    assert client.status == "running"
    assert client.cluster.status.name == "running"
    assert client.submit(sum, [3, 4]).result() == 7


def test_cluster_that_cannot_scale_reports_the_workers_it_has(client):
    with cluster_client(client.scheduler.address) as handle:
        assert handle.cluster is None
        scaler = WorkerScaler(handle, timeout=5)
        assert not scaler.can_scale
        assert scaler.scale_to(4) == 1  # min(wanted, available)
        assert scaler.n_workers == 1
        assert scaler.workers() == available_workers(client)
        assert scaler.scale_to(1) == 1
    assert _worker_count(client) == 1


def test_scaling_up_and_down(client):
    scaler = WorkerScaler(ClusterHandle(client, embedded=False), timeout=10)
    assert scaler.can_scale
    for wanted in (2, 3, 1):
        assert scaler.scale_to(wanted) == wanted
        assert _worker_count(client) == wanted
        assert len(scaler.workers()) == wanted


def test_same_count_twice_does_not_call_scale_again(client):
    cluster = client.cluster
    scaler = WorkerScaler(ClusterHandle(client, embedded=False), timeout=10)
    calls = cluster.scale_calls
    assert scaler.scale_to(2) == 2
    assert cluster.scale_calls == calls + 1
    assert scaler.scale_to(2) == 2
    assert cluster.scale_calls == calls + 1
    assert scaler.scale_to(1) == 1
    assert cluster.scale_calls == calls + 2
    assert _worker_count(client) == 1
    # The cluster loses its worker behind the scaler's back: asked for the same
    # count, the scaler trusts what it set, until a reset makes it look again.
    cluster.scale(0)
    deadline = time.monotonic() + 10
    while _worker_count(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = cluster.scale_calls
    assert scaler.scale_to(1) == 1 and cluster.scale_calls == calls
    scaler.reset()
    assert scaler.scale_to(1) == 1
    assert cluster.scale_calls == calls + 1
    assert _worker_count(client) == 1


def test_scaling_is_capped_at_max_workers(client):
    scaler = WorkerScaler(ClusterHandle(client, embedded=False, max_workers=2), timeout=10)
    assert scaler.scale_to(4) == 2
    assert _worker_count(client) == 2


def test_scale_to_rejects_bad_counts(client):
    scaler = WorkerScaler(ClusterHandle(client, embedded=False))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_workers must be a positive int"):
            scaler.scale_to(bad)


def test_scaling_timeout_says_what_was_wanted_and_what_came():
    with _inprocess(StuckCluster) as cluster, Client(cluster, set_as_default=False) as client:
        scaler = WorkerScaler(ClusterHandle(client, embedded=False), timeout=0.5)
        with pytest.raises(
            TimeoutError, match=r"wanted 2 Dask workers .* has 1 after 0\.5 s.*timeout"
        ):
            scaler.scale_to(2)
        # The failed target is forgotten, so the next call tries again.
        with pytest.raises(TimeoutError):
            scaler.scale_to(2)


def test_available_workers_sorted_by_numeric_port(client):
    addresses = ["tcp://127.0.0.1:10000", "tcp://127.0.0.1:9999", "tcp://127.0.0.0:20000"]
    assert sorted(addresses, key=_address_key) == [
        "tcp://127.0.0.0:20000",
        "tcp://127.0.0.1:9999",
        "tcp://127.0.0.1:10000",
    ]
    assert available_workers(client) == sorted(
        client.scheduler_info(n_workers=-1)["workers"], key=_address_key
    )


class _CountingClient:
    """A client whose scheduler answers ``identity`` with one worker and counts the asks."""

    def __init__(self):
        self.asked = 0
        self.scheduler = self  # client.scheduler.identity is what is synced

    def identity(self, n_workers):
        return {"workers": {"tcp://127.0.0.1:1": {}}}

    def sync(self, method, **kwargs):
        self.asked += 1
        return method(**kwargs)


def test_workers_info_asks_the_scheduler_again_only_when_its_answer_is_old(monkeypatch):
    from types import SimpleNamespace

    from adadamp import scaling

    now = [1000.0]
    monkeypatch.setattr(scaling, "time", SimpleNamespace(monotonic=lambda: now[0]))
    client = _CountingClient()
    for _ in range(3):
        assert available_workers(client) == ["tcp://127.0.0.1:1"]
    assert client.asked == 1
    now[0] += 1.5 * scaling.WORKERS_INFO_MAX_AGE_S
    scaling.workers_info(client)
    assert client.asked == 2
    # After the cluster was scaled, the next look asks at once.
    scaling.forget_workers_info(client)
    scaling.workers_info(client)
    assert client.asked == 3
    # Each client has its own answer.
    other = _CountingClient()
    scaling.workers_info(other)
    assert (client.asked, other.asked) == (3, 1)
