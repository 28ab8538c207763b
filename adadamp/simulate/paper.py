"""The reproduction of the paper's two tables of training times.

:func:`paper_table` plans the paper's five schedules from their dampers,
simulates them under the three presets of :data:`~adadamp.simulate.model.NETWORKS`
with the model's defaults (a Wide-ResNet-16-4 on a T4 GPU), and puts the
paper's figures next to the simulated ones; ``adadamp simulate --paper``
prints :func:`format_paper_table` of it. See ``docs/simulation.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from ..dampers import GeoDamp, GeoDampLR
from .model import (
    NETWORKS,
    PAPER_CENTRALIZED_OVERHEAD_S,
    T4_SECONDS_PER_EXAMPLE,
    WRN_16_4_PARAMS,
    Architecture,
    Network,
    PlannedRun,
    SimResult,
    simulate_run,
)

__all__ = [
    "PAPER_DELAY",
    "PAPER_EPOCHS",
    "PAPER_FACTOR",
    "PAPER_GRADS_PER_WORKER",
    "PAPER_N_EXAMPLES",
    "PAPER_RUNS",
    "PaperRow",
    "PaperTable",
    "format_paper_table",
    "paper_table",
]


@dataclass(frozen=True)
class _PaperRun:
    label: str
    initial: int
    max_batch_size: int
    lr_decay: bool
    updates: int
    max_workers: int
    minutes: dict[str, float]


#: The paper's two tables (training time in minutes; the centralized column
#: has two decimals in its first table). CIFAR-10, ~200 epochs, factor 5 at
#: epochs 60, 120 and 180, 128 examples per worker.
PAPER_RUNS: tuple[_PaperRun, ...] = (
    _PaperRun(
        "128",
        128,
        128,
        True,
        78_200,
        1,
        {"centralized": 200.19, "decentralized-moderate": 121.7, "decentralized-high": 121.5},
    ),
    _PaperRun(
        "640",
        128,
        640,
        False,
        34_520,
        5,
        {"centralized": 116.86, "decentralized-moderate": 73.6, "decentralized-high": 71.8},
    ),
    _PaperRun(
        "3.2k",
        128,
        3_200,
        False,
        29_480,
        25,
        {"centralized": 107.17, "decentralized-moderate": 67.7, "decentralized-high": 65.5},
    ),
    _PaperRun(
        "16k",
        128,
        16_000,
        False,
        29_240,
        125,
        {"centralized": 107.49, "decentralized-moderate": 67.7, "decentralized-high": 65.7},
    ),
    _PaperRun(
        "5.1k (*2)",
        256,
        5_120,
        False,
        14_960,
        40,
        {"centralized": 69.87, "decentralized-moderate": 45.1, "decentralized-high": 43.5},
    ),
)
PAPER_N_EXAMPLES = 50_000
PAPER_EPOCHS = 200
PAPER_DELAY = 60
PAPER_FACTOR = 5
PAPER_GRADS_PER_WORKER = 128


@cache
def _paper_plan(initial: int, max_batch_size: int, lr_decay: bool) -> tuple[np.ndarray, np.ndarray]:
    # Planning 200 epochs walks ~78k updates in Python; the schedules are fixed, so cache them.
    damper_cls = GeoDampLR if lr_decay else GeoDamp
    damper = damper_cls(initial=initial, delay=PAPER_DELAY, factor=PAPER_FACTOR)
    sizes, full = PlannedRun(damper, PAPER_N_EXAMPLES, PAPER_EPOCHS, max_batch_size).plan()
    sizes.setflags(write=False)
    full.setflags(write=False)
    return sizes, full


@dataclass(frozen=True)
class PaperRow:
    """One schedule of the paper's tables, simulated, next to the paper's figures."""

    label: str
    initial: int
    max_batch_size: int
    updates: int
    paper_updates: int
    max_workers: int
    paper_max_workers: int
    minutes: dict[str, float]
    """Preset -> simulated minutes with the default (measured, unfitted) parameters."""
    fitted_minutes: dict[str, float]
    """Preset -> simulated minutes with the overheads fitted to the paper's times."""
    paper_minutes: dict[str, float]


@dataclass(frozen=True)
class PaperTable:
    """:func:`paper_table`'s result: the rows and the fitted overheads per preset."""

    rows: list[PaperRow]
    fitted: dict[str, tuple[float, float]]
    """Preset -> (overhead_s, overhead_per_worker_s) fitted to the paper's five times."""
    seconds_per_example: float
    n_params: int


def _fit_overheads(
    base_s: np.ndarray, n_updates: np.ndarray, extra_workers: np.ndarray, target_s: np.ndarray
) -> tuple[float, float]:
    """Least squares for ``target = base + a * n_updates + b * extra_workers``, ``a, b >= 0``."""
    features = np.stack([n_updates, extra_workers], axis=1).astype(float)
    residual = target_s - base_s
    (a, b), *_ = np.linalg.lstsq(features, residual, rcond=None)
    if a >= 0 and b >= 0:
        return float(a), float(b)
    # With two unknowns the non-negative optimum lies on an axis when the free one does not.
    candidates = [(0.0, 0.0)]
    for j in (0, 1):
        col = features[:, j]
        if col @ col > 0:
            value = max(0.0, float(col @ residual / (col @ col)))
            candidates.append((value, 0.0) if j == 0 else (0.0, value))
    return min(candidates, key=lambda ab: float(np.sum((features @ np.array(ab) - residual) ** 2)))


def paper_table(
    seconds_per_example: float = T4_SECONDS_PER_EXAMPLE, n_params: int = WRN_16_4_PARAMS
) -> PaperTable:
    """Rebuild the paper's schedules and simulate them under the three presets.

    Each schedule is planned from its damper over 200 epochs of 50,000
    examples (``GeoDamp(initial, delay=60, factor=5)`` capped at the row's max
    batch size, ``GeoDampLR`` for the 128 row) and the workers follow
    ``workers_for(B, 128)``. Two sets of times are returned:

    - ``minutes``: the presets as they are (measured compute time and
      centralized overhead, network formulas); nothing fitted.
    - ``fitted_minutes``: per preset, ``overhead_s`` and
      ``overhead_per_worker_s`` fitted by non-negative least squares to the
      paper's five times, compute and communication held at their defaults.
      The fitted values are in ``PaperTable.fitted``.
    """

    def simulate(run: _PaperRun, network: Network, architecture: Architecture) -> SimResult:
        sizes, full = _paper_plan(run.initial, run.max_batch_size, run.lr_decay)
        return simulate_run(
            sizes,
            full_batch_sizes=full,
            network=network,
            architecture=architecture,
            seconds_per_example=seconds_per_example,
            n_params=n_params,
            grads_per_worker=PAPER_GRADS_PER_WORKER,
        )

    rows_base = [{name: simulate(run, *NETWORKS[name]) for name in NETWORKS} for run in PAPER_RUNS]
    fitted: dict[str, tuple[float, float]] = {}
    fitted_minutes: list[dict[str, float]] = [{} for _ in PAPER_RUNS]
    for name, (net, arch) in NETWORKS.items():
        # Fit on top of compute + communication only: the overheads are the unknowns.
        base = np.array(
            [r[name].compute_s.sum() + r[name].communication_s.sum() for r in rows_base]
        )
        n_updates = np.array([r[name].n_updates for r in rows_base])
        extra = np.array([float((r[name].workers - 1).sum()) for r in rows_base])
        target = np.array([run.minutes[name] * 60 for run in PAPER_RUNS])
        a, b = _fit_overheads(base, n_updates, extra, target)
        fitted[name] = (a, b)
        arch_fit = replace(arch, overhead_s=a, overhead_per_worker_s=b)
        for i, run in enumerate(PAPER_RUNS):
            fitted_minutes[i][name] = simulate(run, net, arch_fit).total_minutes
    rows = []
    for run, sims, fit in zip(PAPER_RUNS, rows_base, fitted_minutes):
        any_sim = next(iter(sims.values()))
        rows.append(
            PaperRow(
                label=run.label,
                initial=run.initial,
                max_batch_size=run.max_batch_size,
                updates=any_sim.n_updates,
                paper_updates=run.updates,
                max_workers=any_sim.max_workers,
                paper_max_workers=run.max_workers,
                minutes={name: s.total_minutes for name, s in sims.items()},
                fitted_minutes=fit,
                paper_minutes=dict(run.minutes),
            )
        )
    return PaperTable(rows, fitted, seconds_per_example, n_params)


def format_paper_table(table: PaperTable) -> str:
    """The paper table as plain text: schedules, then minutes paper | model | fitted."""
    lines = [
        f"Schedules: CIFAR-10 (n={PAPER_N_EXAMPLES:,}), {PAPER_EPOCHS} epochs, "
        f"batch x{PAPER_FACTOR} every {PAPER_DELAY} epochs up to the max batch size, "
        f"{PAPER_GRADS_PER_WORKER} examples per worker",
        "(past its max batch size a schedule decays the learning rate instead; "
        "the 128 row only does that)",
        f"Model: {table.n_params:,} parameters, {table.seconds_per_example * 128 * 1e3:.2f} ms "
        "of compute per 128 examples",
        "",
        f"{'max batch':<11}{'initial':>8}{'updates':>10}{'paper':>10}"
        f"{'max workers':>13}{'paper':>7}",
    ]
    for r in table.rows:
        lines.append(
            f"{r.label:<11}{r.initial:>8}{r.updates:>10,}{r.paper_updates:>10,}"
            f"{r.max_workers:>13}{r.paper_max_workers:>7}"
        )
    names = list(NETWORKS)
    lines += ["", "Training time (minutes)", f"{'':<11}" + "".join(f"{n:>27}" for n in names)]
    lines.append(f"{'max batch':<11}" + f"{'paper':>11}{'model':>8}{'fitted':>8}" * len(names))
    for r in table.rows:
        # The paper's figures are printed as the paper gives them (one or two decimals).
        cells = "".join(
            f"{r.paper_minutes[n]!s:>11}{r.minutes[n]:>8.2f}{r.fitted_minutes[n]:>8.2f}"
            for n in names
        )
        lines.append(f"{r.label:<11}{cells}")
    lines += [
        "",
        "model:  defaults, nothing fitted (centralized overhead = measured "
        f"{PAPER_CENTRALIZED_OVERHEAD_S * 1e3:.2f} ms/update, decentralized overhead = 0)",
        "fitted: overhead(P) = a + b (P - 1) per update, a, b >= 0 by least squares "
        "on the paper's five times:",
    ]
    for n in names:
        a, b = table.fitted[n]
        lines.append(
            f"  {n:<24} a = {a * 1e3:6.2f} ms/update   b = {b * 1e3:6.2f} ms per extra worker"
        )
    return "\n".join(lines)
