"""Dask clusters shared by tests: real worker processes, one thread each."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest


def process_cluster(n_workers: int = 1, env: dict | None = None):
    """A LocalCluster of worker processes (one thread each) on 127.0.0.1.

    ``env``: environment variables set in the worker processes.

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
        env=env or {},
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


# --------------------------------------------------------------------------- CLI clusters

# Seconds a scheduler or worker process may take to start (two busy cores:
# importing torch and distributed alone takes a few).
CLI_START_TIMEOUT_S = 60.0
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _cli(command: str) -> list[str]:
    """``dask scheduler`` / ``dask worker`` run by this interpreter, whatever its venv."""
    return [sys.executable, "-m", f"distributed.cli.dask_{command}"]


def _log_tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _process_tree(pid: int) -> set[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return set()


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class CliCluster:
    """A ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, started from the CLI.

    The processes run in ``workdir`` (a folder of their own) with this tests
    folder put first on ``PYTHONPATH``, so they import what the installed
    packages and the test helpers provide, and nothing the test process added
    to ``sys.path`` (a test's ``tmp_path``, say).
    Each process is the leader of its own session, so that killing its group
    takes a nanny's worker process with it.
    """

    def __init__(self, workdir: str, nanny: bool = True):
        self.workdir = workdir
        self.nanny = nanny
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [_TESTS_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            # Tiny models on two shared cores: one compute thread per process.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        self.processes: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}  # address -> its process
        self.pids: set[int] = set()  # every process started, nannies' children included
        self._client = None
        scheduler_file = os.path.join(workdir, "scheduler.json")
        # Port 0 and the scheduler file: the OS picks a free port, no race.
        self.scheduler = self._start(
            "scheduler",
            [
                *_cli("scheduler"),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--scheduler-file",
                scheduler_file,
            ],
        )
        deadline = time.monotonic() + CLI_START_TIMEOUT_S
        address = None
        while address is None:
            self._check_running(self.scheduler, "scheduler", deadline)
            with contextlib.suppress(OSError, ValueError, KeyError):
                with open(scheduler_file) as f:
                    address = json.load(f)["address"]
            if address is None:
                time.sleep(0.1)
        self.address: str = address

    # ------------------------------------------------------------ processes
    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}-{len(self.processes)}.log"), "wb")
        try:
            process = subprocess.Popen(
                args,
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        process.log_path = log.name  # type: ignore[attr-defined]
        self.processes.append(process)
        self.pids.add(process.pid)
        return process

    def _check_running(self, process: subprocess.Popen, what: str, deadline: float) -> None:
        if process.poll() is not None:
            raise RuntimeError(
                f"the {what} exited with {process.returncode} while starting:\n"
                + _log_tail(process.log_path)  # type: ignore[attr-defined]
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the {what} did not start within {CLI_START_TIMEOUT_S:g} s:\n"
                + _log_tail(process.log_path)  # type: ignore[attr-defined]
            )

    def add_worker(self) -> str:
        """Start one ``dask worker`` (one process, one thread); its address once it joined."""
        from adadamp.scaling import available_workers

        before = set(available_workers(self.client))
        args = [
            *_cli("worker"),
            self.address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--nworkers",
            "1",
            "--no-dashboard",
            # Should this fixture's teardown ever miss it, it ends itself.
            "--death-timeout",
            "60",
            "--name",
            f"cli-worker-{len(self.processes)}",
        ]
        if not self.nanny:
            # Nothing restarts a worker that dies: the case of a bare cluster.
            args.append("--no-nanny")
        process = self._start("worker", args)
        deadline = time.monotonic() + CLI_START_TIMEOUT_S
        while True:
            self._check_running(process, "worker", deadline)
            joined = set(available_workers(self.client)) - before - set(self.workers)
            if joined:
                (address,) = joined
                break
            time.sleep(0.1)
        self.workers[address] = process
        self.pids |= _process_tree(process.pid)
        return address

    @property
    def client(self):
        """A client of this process on the scheduler (not the default one), made on first use."""
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, set_as_default=False, timeout=30)
        return self._client

    def close(self) -> None:
        """Kill every process started (SIGKILL to each group) and reap them."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=5)
            self._client = None
        for process in self.processes:
            self.pids |= _process_tree(process.pid)
        for process in reversed(self.processes):  # workers first, the scheduler last
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    def survivors(self) -> set[int]:
        """The processes started (and their children) that still run."""
        deadline = time.monotonic() + 10  # the OS may take a moment to reap
        while (alive := {pid for pid in self.pids if _alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive


@pytest.fixture(scope="module")
def start_cli_cluster(tmp_path_factory):
    """Start CLI clusters: ``start_cli_cluster(n_workers, nanny=True)`` -> CliCluster.

    Every cluster started is killed when the module's tests are done, and the
    teardown fails if any of their processes outlives that.
    """
    clusters: list[CliCluster] = []

    def start(n_workers: int, nanny: bool = True) -> CliCluster:
        cluster = CliCluster(str(tmp_path_factory.mktemp("dask-cli")), nanny=nanny)
        clusters.append(cluster)
        for _ in range(n_workers):
            cluster.add_worker()
        return cluster

    yield start
    for cluster in clusters:
        cluster.close()
    survivors = set().union(*(cluster.survivors() for cluster in clusters))
    assert not survivors, f"Dask CLI processes outlived the test module: {sorted(survivors)}"


@pytest.fixture(scope="module")
def cli_cluster(start_cli_cluster):
    """A CLI cluster of two workers (with nannies), shared by a test module."""
    return start_cli_cluster(2)
