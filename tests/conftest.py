"""Dask clusters shared by tests: real worker processes, one thread each."""

from __future__ import annotations

import logging

import pytest


def process_cluster(n_workers: int = 1):
    """A LocalCluster of worker processes (one thread each) on 127.0.0.1.

    Its client is not made the default one, so fits with ``client=None``
    elsewhere in the run still start their own cluster.
    """
    # Imported here, not at the top: with distributed imported while conftest
    # loads, silence_logs left pytest's log capture handlers at ERROR during
    # the tests, so caplog saw no warning (distributed 2026.8, pytest 9).
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster, set_as_default=False)


@pytest.fixture(scope="module")
def dask_client():
    """One process cluster per test module, starting with one worker.

    Tests scale it as they need (fits with ``client=`` scale it themselves);
    starting a worker process takes seconds, so a module reuses it.
    """
    cluster, client = process_cluster(1)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def fresh_dask_client():
    """A cluster of its own for one test, e.g. one that kills a worker: two workers."""
    cluster, client = process_cluster(2)
    yield client
    client.close()
    cluster.close()
