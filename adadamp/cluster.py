"""Resolve the estimators' ``client`` parameter to a running Dask client.

The estimators accept ``client=None`` (use the current client, or start a
local cluster for the duration of the fit), a scheduler address string, or a
``distributed.Client``. :func:`validate_client` checks the value before any
cluster work starts; :func:`cluster_client` turns it into a client and owns
whatever it had to start, so that nothing it started outlives the fit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distributed import Client, LocalCluster
from distributed.comm.addressing import parse_host_port

from ._devices import cuda_devices

__all__ = ["ClusterHandle", "cluster_client", "cpu_count", "current_client", "validate_client"]

#: Schemes the Dask comm layer understands; an address with another scheme
#: would only fail later, after a connection timeout.
_KNOWN_SCHEMES = ("tcp", "tls", "inproc", "ucx", "ws", "wss")

_ACCEPTED = (
    "None (use the current client, or start a local cluster), "
    "a scheduler address string such as 'tcp://127.0.0.1:8786', "
    "or a distributed.Client"
)


def cpu_count() -> int:
    """The number of CPU cores this process may run on.

    ``os.sched_getaffinity`` respects CPU pinning (containers, ``taskset``),
    which ``os.cpu_count`` does not; the latter is the fallback where the
    former does not exist (macOS, Windows).
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platform dependent
        return max(1, os.cpu_count() or 1)


def default_worker_limit() -> int:
    """The most workers an embedded cluster starts: one per core but one.

    The core left over is the client's and the scheduler's: the client runs
    a fit's epoch-end work (validation, callbacks) and the scheduler routes
    every message, and a rank that shares its core with them stalls every
    other rank at the next all-reduce. On a 2-core machine two workers
    made the decentralized fits of ``adadamp compare`` slower than one.
    """
    return max(1, cpu_count() - 1)


# One DNS label: letters, digits and inner hyphens (RFC 1123).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a syntactically valid host name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    return 0 < len(host) <= 253 and all(_LABEL.fullmatch(label) for label in host.split("."))


def _check_address(address: str) -> None:
    """Raise ``ValueError`` unless ``address`` looks like a scheduler address."""
    hint = (
        f"client={address!r} is not a scheduler address; pass one like "
        "'tcp://127.0.0.1:8786' or '127.0.0.1:8786', or client=None to start a local cluster"
    )
    if not address or address != address.strip() or any(c.isspace() for c in address):
        raise ValueError(hint)
    slip = re.match(rf"({'|'.join(_KNOWN_SCHEMES)})(:/|//)(?!/)", address)
    if "://" not in address and slip:
        # "tcp//host:port", "tcp:/host:port": a scheme with its separator mistyped.
        fixed = f"{slip.group(1)}://{address[slip.end() :]}"
        raise ValueError(f"{hint} (did you mean {fixed!r}?)")
    if "://" in address:
        scheme, location = address.split("://", 1)
        if scheme not in _KNOWN_SCHEMES:
            raise ValueError(
                f"{hint} (unknown scheme {scheme!r}; known: {', '.join(_KNOWN_SCHEMES)})"
            )
        if not location:
            raise ValueError(hint)
        if scheme == "inproc":
            # In-process addresses ("inproc://host/pid/n") have no port.
            return
        # Dask's default scheduler port, which distributed.Client does not fill in itself.
        default_port: int | None = 8786
    else:
        default_port = None  # without a scheme, demand an explicit "host:port"
        location = address
    try:
        host, port = parse_host_port(location, default_port=default_port)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{hint} ({exc})") from None
    if not _is_host(host):
        raise ValueError(f"{hint} (host {host!r} is neither a host name nor an IP address)")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{hint} (port {port} is out of range)")


def _dask_connect_timeout() -> float:
    """Dask's connect timeout in seconds (``distributed.comm.timeouts.connect``)."""
    import dask.config
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s"))


def _host_of(address: str) -> str:
    return parse_host_port(address.split("://", 1)[-1])[0]


def _port_of(address: str) -> int:
    return int(parse_host_port(address.split("://", 1)[-1])[1])


def _with_port(address: str) -> str:
    """``address`` with Dask's default scheduler port when it names none."""
    if "://" not in address or address.startswith("inproc://"):
        return address
    _, location = address.split("://", 1)
    host, port = parse_host_port(location, default_port=8786)
    return address if location.endswith(f":{port}") else f"{address}:{port}"


def validate_client(client: Any) -> None:
    """Check the estimators' ``client`` parameter without touching any cluster.

    Parameters
    ----------
    client : None, str or distributed.Client
        ``None`` (use the current client, or start a local cluster), a
        scheduler address such as ``"tcp://127.0.0.1:8786"`` or
        ``"127.0.0.1:8786"``, or a ``distributed.Client``.

    Raises
    ------
    TypeError
        If ``client`` is of any other type.
    ValueError
        If ``client`` is a string that is not a scheduler address: an unknown
        scheme, a missing host, a port missing (without a scheme) or out of
        range, or white space.
    """
    if client is None or isinstance(client, Client):
        return
    if isinstance(client, str):
        _check_address(client)
        return
    extra = ""
    if hasattr(client, "scheduler_address") and hasattr(client, "scale"):
        # A cluster object (LocalCluster, SpecCluster, ...) is a common slip.
        extra = "; to use a cluster object, pass distributed.Client(cluster)"
    raise TypeError(f"client must be {_ACCEPTED}; got {type(client).__name__}{extra}")


def _check_count(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None; got {value!r}")


@dataclass(frozen=True)
class ClusterHandle:
    """The Dask client a fit runs on, and whether the fit owns its cluster.

    Parameters
    ----------
    client : distributed.Client
        The client to submit work with.
    embedded : bool
        True when :func:`cluster_client` started a local cluster for this
        fit (it is closed when the context exits); False for the current
        client, a passed client or a client connected to an address.
    max_workers : int or None
        The most workers the cluster should be scaled to: for an embedded
        cluster ``max_workers`` if given, else the number of CPU cores; for
        other clusters the ``max_workers`` passed, or None (no limit).
    """

    client: Client
    embedded: bool
    max_workers: int | None = None

    @property
    def cluster(self) -> Any | None:
        """The client's cluster object, or None (e.g. connected by address)."""
        return getattr(self.client, "cluster", None)

    @property
    def can_scale(self) -> bool:
        """Whether this process can change the cluster's number of workers."""
        return self.cluster is not None and callable(getattr(self.cluster, "scale", None))


def current_client() -> Client | None:
    """The client a ``client=None`` fit should use, if the user has one running."""
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:  # no current client, and not inside a Dask task
        return None
    if client.status in ("closing", "closed"):
        return None
    return client


# Dask settings of the embedded cluster's workers. Without a dashboard nobody
# sees the workers' statistical profiles, and sampling the training thread's
# stack every 10 ms made a small model's fits about 4% slower. A dotted key:
# the nanny's merge is shallow, and a nested {"distributed": ...} would
# replace every other distributed setting in the workers.
EMBEDDED_WORKER_CONFIG = {"distributed.worker.profile.enabled": False}


@contextlib.contextmanager
def cluster_client(
    client: Client | str | None,
    n_workers_hint: int | None = None,
    device: str = "cpu",
    max_workers: int | None = None,
    connect_timeout: float | None = None,
    silence_logs: int = logging.ERROR,
) -> Iterator[ClusterHandle]:
    """Provide a running Dask client for the duration of a ``with`` block.

    Parameters
    ----------
    client : None, str or distributed.Client
        What the estimator was given (see :func:`validate_client`).

        - ``None``: the current client if there is one (``get_client()``);
          otherwise a local cluster of worker processes (one thread each, no
          dashboard, listening on free ports of 127.0.0.1 only) is started, and it and its
          client are closed when the block exits, error or not.
        - an address string: a client is connected to that scheduler and
          closed on exit; the remote cluster is left running.
        - a ``distributed.Client``: used as is and never closed.
    n_workers_hint : int, optional
        How many workers an embedded cluster starts with (default 1), capped
        at its maximum. Ignored for other clusters; :class:`~adadamp.scaling.
        WorkerScaler` sets the count it needs.
    device : str, default "cpu"
        The torch device the workers compute on. For ``"cuda"`` an embedded
        cluster has at most one worker per visible GPU, and a ``ValueError``
        is raised if none is visible.
    max_workers : int, optional
        The most workers an embedded cluster may be scaled to; default: the
        number of CPU cores (and of GPUs for CUDA). Each worker's memory
        limit is the machine's memory divided by this maximum, so the workers
        fit in memory together once grown. For other clusters it is only
        recorded in the handle.
    connect_timeout : float, optional
        Seconds to wait when connecting to an address; default: Dask's
        ``distributed.comm.timeouts.connect`` setting (30 s unless configured).
    silence_logs : int, default logging.ERROR
        Log level of an embedded cluster's scheduler and workers. Starting and
        stopping workers logs routine warnings; errors still show.

    Yields
    ------
    ClusterHandle
        The client and whether it runs on an embedded cluster.

    Raises
    ------
    TypeError, ValueError
        If a parameter is invalid; raised before any cluster work starts.
    OSError
        If no scheduler answers at the address within ``connect_timeout``.

    Notes
    -----
    Worker processes are started with the ``spawn`` method, so a script that
    fits with ``client=None`` needs the ``if __name__ == "__main__":`` guard.
    """
    validate_client(client)
    _check_count("n_workers_hint", n_workers_hint)
    _check_count("max_workers", max_workers)
    device_limit = cuda_devices(device)

    if isinstance(client, Client):
        yield ClusterHandle(client, embedded=False, max_workers=max_workers)
        return

    if isinstance(client, str):
        address = _with_port(client)
        timeout = connect_timeout if connect_timeout is not None else _dask_connect_timeout()
        try:
            connected = Client(address, timeout=timeout, set_as_default=False)
        except OSError as exc:
            raise OSError(
                f"no Dask scheduler answered at client={client!r} within {timeout:g} s ({exc}). "
                f"Start one there with `dask scheduler --host {_host_of(address)} --port "
                f"{_port_of(address)}` and at least one `dask worker {address}`, fix the address, "
                "or pass client=None to train on a local cluster started for the fit."
            ) from exc
        try:
            yield ClusterHandle(connected, embedded=False, max_workers=max_workers)
        finally:
            connected.close()
        return

    current = current_client()
    if current is not None:
        yield ClusterHandle(current, embedded=False, max_workers=max_workers)
        return

    limit = max_workers if max_workers is not None else default_worker_limit()
    if device_limit is not None:
        limit = min(limit, device_limit)
    start = min(n_workers_hint or 1, limit, cpu_count())
    with contextlib.ExitStack() as stack:
        from distributed.system import MEMORY_LIMIT

        cluster = LocalCluster(
            n_workers=start,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            # The scheduler serves its HTTP routes (health, metrics) even
            # without a dashboard, on port 8787 unless told otherwise; a free
            # port on 127.0.0.1 avoids clashing with the user's own cluster.
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=silence_logs,
            # LocalCluster would size memory for the starting count only;
            # size it for the most workers the cluster may grow to.
            memory_limit=max(1, MEMORY_LIMIT // limit),
            config=EMBEDDED_WORKER_CONFIG,
        )
        stack.callback(cluster.close)
        # Not made the default client: the fit passes the handle's client
        # explicitly, and the user's global Dask state stays untouched.
        embedded = Client(cluster, set_as_default=False)
        # Closed before the cluster (ExitStack unwinds in reverse), so the
        # client does not log lost connections to a closing scheduler.
        stack.callback(embedded.close)
        yield ClusterHandle(embedded, embedded=True, max_workers=limit)
