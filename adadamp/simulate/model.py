"""A wall-clock model of a training run under a network.

The time of one model update with batch size ``B`` on ``P`` workers is

``t(B, P) = compute(B, P) + communication(P) + overhead(P)``

- ``compute(B, P) = ceil(B / P) * seconds_per_example``: the ``B`` examples
  are split into ``P`` contiguous slices and a synchronous update waits for
  the largest slice, which holds ``ceil(B / P)`` examples.
- ``communication(P)`` depends on the architecture (see :class:`Decentralized`
  and :class:`Centralized`); the model has ``M = n_params * bytes_per_param``
  bytes, and a network moves ``bandwidth_bps`` bits per second.
- ``overhead(P) = overhead_s + overhead_per_worker_s * (P - 1)``: task
  scheduling, serialization and the like, which no network formula captures.

``P = workers_for(B, grads_per_worker, min_workers, max_workers)`` unless the
caller passes the worker counts of a measured run; for a damper's schedule
``B`` there is the update's full batch size, so the short last update of an
epoch keeps the epoch's workers, as in the engines. A run's time is the sum of
its update times (plus ``rescale_s`` whenever the worker count changes). The
model ignores evaluation, data loading and stragglers.

Everything a measurement can replace is a parameter: ``seconds_per_example``
and ``n_params`` of the model, the overheads of the architecture, the network.
The defaults describe the paper's setup (a Wide-ResNet-16-4 on a T4 GPU);
:func:`adadamp.simulate.paper.paper_table` rebuilds the paper's two tables
with them. See ``docs/simulation.md``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dampers import BaseDamper
from ..scaling import workers_for
from ..schedule import plan_epochs

__all__ = [
    "ARCHITECTURES",
    "HIGH",
    "MODERATE",
    "NETWORKS",
    "PAPER_CENTRALIZED_OVERHEAD_S",
    "T4_SECONDS_PER_EXAMPLE",
    "WRN_16_4_PARAMS",
    "Architecture",
    "Centralized",
    "Decentralized",
    "Network",
    "PlannedRun",
    "SimResult",
    "UpdateTime",
    "batch_sizes_of",
    "compute_seconds",
    "resolve",
    "simulate_run",
    "update_records",
    "update_time",
]

#: Parameters of a Wide-ResNet-16-4 for CIFAR-10 (the paper's model, "about 2.75 million").
WRN_16_4_PARAMS = 2_750_000

#: Seconds of gradient computation per example on one NVIDIA T4 GPU: 78.32 ms
#: for 128 examples, measured for the paper's Wide-ResNet-16-4 (experiment
#: repository of the paper, ``exp-dask/simulation-sleep-time``).
T4_SECONDS_PER_EXAMPLE = 0.07832 / 128

#: Per-update overhead of the paper's centralized engine measured on one
#: worker: a deep copy of the model inside every gradient task (58.56 ms, the
#: tasks run in parallel so it is paid once per update) plus the update task
#: (11 ms). Same source as :data:`T4_SECONDS_PER_EXAMPLE`. Not fitted. It is
#: :class:`Centralized`'s default overhead, hence here and not in ``paper.py``.
PAPER_CENTRALIZED_OVERHEAD_S = 0.05856 + 0.011


@dataclass(frozen=True)
class Network:
    """The link between two machines.

    Parameters
    ----------
    bandwidth_bps : float
        Bits per second one machine can send (and receive) at once (> 0).
    latency_s : float
        Seconds before the first bit of a message arrives (>= 0).
    """

    bandwidth_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"Network: bandwidth_bps must be > 0, got {self.bandwidth_bps!r}.")
        if not self.latency_s >= 0:
            raise ValueError(f"Network: latency_s must be >= 0, got {self.latency_s!r}.")

    def transfer_seconds(self, n_bytes: float) -> float:
        """Seconds to push ``n_bytes`` through the link, latency excluded."""
        return 8.0 * n_bytes / self.bandwidth_bps

    def describe(self) -> str:
        return f"{self.bandwidth_bps / 1e9:g} Gb/s, {self.latency_s * 1e6:g} us latency"


@dataclass(frozen=True)
class Architecture:
    """How the workers of an update exchange the model and the gradients.

    Parameters
    ----------
    overhead_s : float
        Seconds added to every update whatever the workers (task scheduling,
        serialization, the optimizer step when it is a task of its own).
    overhead_per_worker_s : float
        Seconds added per worker beyond the first (per-task costs that grow
        with ``P``). ``overhead(P) = overhead_s + overhead_per_worker_s * (P - 1)``.
    rescale_s : float
        Seconds charged once each time the worker count changes from one update
        to the next (``cluster.scale`` and, for the decentralized engine, a new
        process group). The paper does not model it; 0 by default.
    """

    overhead_s: float = 0.0
    overhead_per_worker_s: float = 0.0
    rescale_s: float = 0.0

    name = "architecture"

    def __post_init__(self) -> None:
        for name in ("overhead_s", "overhead_per_worker_s", "rescale_s"):
            value = getattr(self, name)
            # typeshed's numbers stub is incomplete (it says so): Real declares only < and
            # <=, while the real types (int, float, Fraction, NumPy scalars) support >=.
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value >= 0):  # type: ignore[operator]
                raise ValueError(
                    f"{type(self).__name__}: {name} must be a number >= 0, got {value!r}."
                )

    def communication_seconds(self, workers: Any, model_bytes: float, network: Network) -> Any:
        """Seconds of communication per update for ``workers`` (int or array)."""
        raise NotImplementedError

    def overhead_seconds(self, workers: Any) -> Any:
        """``overhead_s + overhead_per_worker_s * (P - 1)`` (int or array)."""
        return self.overhead_s + self.overhead_per_worker_s * (np.asarray(workers) - 1)

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Decentralized(Architecture):
    """Every worker holds the model; gradients are summed by a ring all-reduce.

    ``communication(P) = 2 (P - 1) / P * M * 8 / bandwidth + 2 (P - 1) * latency``,
    and 0 for ``P = 1``. A ring all-reduce runs a reduce-scatter then an
    all-gather, each ``P - 1`` steps that move ``M / P`` bytes per worker, all
    links busy at once: each worker sends ``2 (P - 1) / P * M`` bytes in
    ``2 (P - 1)`` messages. The time barely grows with ``P``.
    """

    name = "decentralized"

    def communication_seconds(self, workers: Any, model_bytes: float, network: Network) -> Any:
        p = np.asarray(workers, dtype=float)
        seconds = (
            2 * (p - 1) / p * network.transfer_seconds(model_bytes)
            + 2 * (p - 1) * network.latency_s
        )
        return np.where(p > 1, seconds, 0.0)

    def describe(self) -> str:
        return "decentralized (ring all-reduce)"


@dataclass(frozen=True)
class Centralized(Architecture):
    """A parameter server sends the model to every worker and receives every gradient.

    ``communication(P) = 2 P * M * 8 / bandwidth + 2 * latency``: the server's
    one link carries ``P`` copies of the model out and ``P`` gradients in, one
    after the other, while the latency of the two phases overlaps across
    workers. Even ``P = 1`` pays a round trip (the server is not the worker).
    The default ``overhead_s`` is the paper engine's measured per-update
    overhead, :data:`PAPER_CENTRALIZED_OVERHEAD_S` (69.56 ms).
    """

    overhead_s: float = PAPER_CENTRALIZED_OVERHEAD_S

    name = "centralized"

    def communication_seconds(self, workers: Any, model_bytes: float, network: Network) -> Any:
        p = np.asarray(workers, dtype=float)
        return 2 * p * network.transfer_seconds(model_bytes) + 2 * network.latency_s

    def describe(self) -> str:
        return "centralized (parameter server)"


ARCHITECTURES: dict[str, type[Architecture]] = {
    "decentralized": Decentralized,
    "centralized": Centralized,
}

#: The paper's networks (its "Simulations" section): 54 Gb/s with 0.05 us, and
#: 800 Gb/s with 0.025 us (the network of the PyTorch distributed paper).
MODERATE = Network(bandwidth_bps=54e9, latency_s=0.05e-6)
HIGH = Network(bandwidth_bps=800e9, latency_s=0.025e-6)

Preset = tuple[Network, Architecture]

#: Name -> (network, architecture). The paper calls the moderate network
#: "decentralized-medium" in one place; it is the same preset.
NETWORKS: dict[str, Preset] = {
    "centralized": (MODERATE, Centralized()),
    "decentralized-moderate": (MODERATE, Decentralized()),
    "decentralized-high": (HIGH, Decentralized()),
}


def resolve(network: Network | str, architecture: Architecture | str | None = None) -> Preset:
    """Turn a preset name or a network plus an architecture into ``(network, architecture)``.

    An explicit ``architecture`` (an instance, or ``"centralized"`` /
    ``"decentralized"`` for the defaults) replaces the preset's.
    """
    if isinstance(network, str):
        if network not in NETWORKS:
            raise ValueError(
                f"network: unknown preset {network!r}; choose one of {sorted(NETWORKS)}."
            )
        network, preset_arch = NETWORKS[network]
    elif isinstance(network, Network):
        preset_arch = None
    else:
        raise TypeError(
            f"network must be a Network or a preset name, got {type(network).__name__}."
        )
    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture: unknown {architecture!r}; choose one of {sorted(ARCHITECTURES)}."
            )
        architecture = ARCHITECTURES[architecture]()
    if architecture is None:
        architecture = preset_arch
    if architecture is None:
        raise ValueError(
            "architecture: required when network is a Network; pass "
            "'centralized', 'decentralized' or an Architecture instance."
        )
    if not isinstance(architecture, Architecture):
        raise TypeError(f"architecture must be an Architecture, got {type(architecture).__name__}.")
    return network, architecture


def compute_seconds(batch_size: Any, workers: Any, seconds_per_example: float) -> Any:
    """``ceil(B / P) * seconds_per_example``: the largest slice bounds a synchronous update."""
    b = np.asarray(batch_size)
    p = np.asarray(workers)
    return -(-b // p) * seconds_per_example


@dataclass(frozen=True)
class UpdateTime:
    """The time of one update, in seconds, by part."""

    compute_s: float
    communication_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.overhead_s


def update_time(
    batch_size: int,
    workers: int,
    *,
    network: Network | str = "decentralized-moderate",
    architecture: Architecture | str | None = None,
    seconds_per_example: float = T4_SECONDS_PER_EXAMPLE,
    n_params: int = WRN_16_4_PARAMS,
    bytes_per_param: int = 4,
) -> UpdateTime:
    """The time of one update of ``batch_size`` examples on ``workers`` workers.

    See the module docstring for the formulas; :func:`simulate_run` applies the
    same ones to every update of a run.
    """
    net, arch = resolve(network, architecture)
    _check_model(seconds_per_example, n_params, bytes_per_param)
    if batch_size < 1 or workers < 1:
        raise ValueError(
            f"batch_size and workers must be >= 1, got {batch_size!r} and {workers!r}."
        )
    model_bytes = n_params * bytes_per_param
    return UpdateTime(
        compute_s=float(compute_seconds(batch_size, workers, seconds_per_example)),
        communication_s=float(arch.communication_seconds(workers, model_bytes, net)),
        overhead_s=float(arch.overhead_seconds(workers)),
    )


def _check_model(seconds_per_example: float, n_params: int, bytes_per_param: int) -> None:
    if not seconds_per_example >= 0:
        raise ValueError(f"seconds_per_example must be >= 0, got {seconds_per_example!r}.")
    if not n_params >= 0:
        raise ValueError(f"n_params must be >= 0, got {n_params!r}.")
    if not bytes_per_param > 0:
        raise ValueError(f"bytes_per_param must be > 0, got {bytes_per_param!r}.")


@dataclass(frozen=True)
class PlannedRun:
    """A run planned ahead: a damper over ``epochs`` epochs of ``n_examples`` examples.

    Only a damper that does not adapt to the model can be planned. The updates
    are those the engines would run (:func:`adadamp.schedule.plan_epochs`):
    each epoch consumed ``B`` examples at a time, its last update taking what
    is left, ``B`` capped at ``max_batch_size``. As in the engines, the workers
    of an update are sized for the full (capped) batch size, so the short last
    update of an epoch keeps the epoch's workers.
    """

    damper: BaseDamper
    n_examples: int
    epochs: int
    max_batch_size: int | None = None

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch size of every update, and the batch size its workers are sized for."""
        self.damper.validate()
        plans = [
            p
            for epoch in plan_epochs(self.damper, self.n_examples, self.epochs, self.max_batch_size)
            for p in epoch
        ]
        sizes = np.array([p.batch_size for p in plans], dtype=np.int64)
        full = np.array([p.full_batch_size for p in plans], dtype=np.int64)
        return sizes, full

    def batch_sizes(self) -> np.ndarray:
        return self.plan()[0]


Updates = Sequence[int] | np.ndarray | Sequence[Mapping[str, Any]] | PlannedRun


def update_records(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The per-update records of a history.

    Accepts a flat list of update records, or skorch-style epoch records whose
    ``"batches"`` entry lists the epoch's update records.
    """
    records: list[Mapping[str, Any]] = []
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise TypeError(f"history[{i}] must be a dict, got {type(row).__name__}.")
        if "batch_size" in row:
            records.append(row)
        elif "batches" in row:
            records.extend(update_records(row["batches"]))
        else:
            raise ValueError(
                f"history[{i}] has no 'batch_size' (nor 'batches'): keys {sorted(row)}."
            )
    return records


def batch_sizes_of(updates: Updates) -> np.ndarray:
    """The batch size of every update: from ints, a history, or a :class:`PlannedRun`."""
    if isinstance(updates, PlannedRun):
        sizes = updates.batch_sizes()
    else:
        updates = list(updates)
        if updates and isinstance(updates[0], Mapping):
            updates = [r["batch_size"] for r in update_records(updates)]
        sizes = np.asarray(updates)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError("batch_sizes: need a non-empty sequence of batch sizes.")
    if (
        not np.issubdtype(sizes.dtype, np.number)
        or np.any(sizes < 1)
        or np.any(sizes != np.round(sizes))
    ):
        raise ValueError("batch_sizes: every batch size must be an integer >= 1.")
    return sizes.astype(np.int64)


@dataclass(frozen=True, eq=False)
class SimResult:
    """The simulated run, update by update.

    ``update_seconds = compute_s + communication_s + overhead_s``, and
    ``total_seconds`` is their sum. Overheads include ``rescale_s`` on the
    updates whose worker count differs from the previous one.
    """

    batch_sizes: np.ndarray
    workers: np.ndarray
    compute_s: np.ndarray
    communication_s: np.ndarray
    overhead_s: np.ndarray
    update_seconds: np.ndarray
    total_seconds: float
    network: Network
    architecture: Architecture
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_updates(self) -> int:
        return int(self.batch_sizes.size)

    @property
    def max_workers(self) -> int:
        return int(self.workers.max())

    @property
    def total_minutes(self) -> float:
        return self.total_seconds / 60

    @property
    def examples(self) -> int:
        return int(self.batch_sizes.sum())


def simulate_run(
    updates: Updates,
    *,
    network: Network | str = "decentralized-moderate",
    architecture: Architecture | str | None = None,
    seconds_per_example: float = T4_SECONDS_PER_EXAMPLE,
    n_params: int = WRN_16_4_PARAMS,
    bytes_per_param: int = 4,
    grads_per_worker: int = 128,
    min_workers: int = 1,
    max_workers: int | None = None,
    workers: Sequence[int] | np.ndarray | None = None,
    full_batch_sizes: Sequence[int] | np.ndarray | None = None,
) -> SimResult:
    """Simulate the wall-clock time of every update of a run.

    Parameters
    ----------
    updates : sequence of int, history, or PlannedRun
        The batch size of every update; a history (update records with a
        ``"batch_size"`` key, or skorch epoch records with ``"batches"``); or a
        :class:`PlannedRun` of a non-adaptive damper.
    network : Network or str, default="decentralized-moderate"
        A :class:`Network`, or a preset name of :data:`NETWORKS`.
    architecture : Architecture or str, optional
        Replaces the preset's architecture; required with a :class:`Network`.
    seconds_per_example : float
        Gradient time per example on one worker (measure it for a new model).
    n_params, bytes_per_param : int
        The model's size; communication moves ``n_params * bytes_per_param`` bytes.
    grads_per_worker, min_workers, max_workers : int
        Worker counts follow :func:`adadamp.scaling.workers_for`.
    workers : sequence of int, optional
        The worker count of every update (e.g. a measured run's records),
        used instead of :func:`workers_for`.
    full_batch_sizes : sequence of int, optional
        The batch size each update's workers are sized for, when it differs
        from the batch size (the short last update of an epoch). A
        :class:`PlannedRun` supplies it; otherwise the batch sizes are used.

    Returns
    -------
    SimResult
    """
    net, arch = resolve(network, architecture)
    _check_model(seconds_per_example, n_params, bytes_per_param)
    if isinstance(updates, PlannedRun):
        sizes, full = updates.plan()
    else:
        sizes = batch_sizes_of(updates)
        full = sizes
    if full_batch_sizes is not None:
        full = np.asarray(full_batch_sizes, dtype=np.int64)
        if full.shape != sizes.shape or np.any(full < 1):
            raise ValueError(
                f"full_batch_sizes: need one size >= 1 per update ({sizes.size}), "
                f"got shape {full.shape}."
            )
    if workers is None:
        if not (isinstance(grads_per_worker, int) and grads_per_worker >= 1):
            raise ValueError(f"grads_per_worker must be an int >= 1, got {grads_per_worker!r}.")
        # Few distinct batch sizes in a run: call workers_for once per value.
        unique, inverse = np.unique(full, return_inverse=True)
        per_size = np.array(
            [workers_for(int(b), grads_per_worker, min_workers, max_workers) for b in unique]
        )
        p = per_size[inverse]
    else:
        p = np.asarray(workers, dtype=np.int64)
        if p.shape != sizes.shape or np.any(p < 1):
            raise ValueError(
                f"workers: need one count >= 1 per update ({sizes.size}), got shape {p.shape}."
            )
    model_bytes = n_params * bytes_per_param
    compute = compute_seconds(sizes, p, seconds_per_example).astype(float)
    comm = np.broadcast_to(arch.communication_seconds(p, model_bytes, net), sizes.shape).astype(
        float
    )
    overhead = np.broadcast_to(arch.overhead_seconds(p), sizes.shape).astype(float)
    if arch.rescale_s:
        changed = np.concatenate([[False], p[1:] != p[:-1]])
        overhead = overhead + arch.rescale_s * changed
    total = compute + comm + overhead
    return SimResult(
        batch_sizes=sizes,
        workers=p,
        compute_s=compute,
        communication_s=comm,
        overhead_s=overhead,
        update_seconds=total,
        total_seconds=float(total.sum()),
        network=net,
        architecture=arch,
        params=dict(
            seconds_per_example=seconds_per_example,
            n_params=n_params,
            bytes_per_param=bytes_per_param,
            grads_per_worker=grads_per_worker,
        ),
    )
