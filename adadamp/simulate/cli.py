"""``adadamp simulate``: estimate the wall-clock time of a run under a network.

The run is either a recorded history (``--history``: a JSON list of update
records, or a CSV with a ``batch_size`` column) or a ``GeoDamp`` schedule
(``--initial``, ``--factor``, ``--delay``, ``--epochs``, ``--n-examples``,
``--max-batch-size``). ``--paper`` prints the reproduction of the paper's
tables instead. The model itself is :mod:`adadamp.simulate.model`, the
tables :mod:`adadamp.simulate.paper`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..dampers import GeoDamp
from . import model as sim
from .paper import format_paper_table, paper_table

# Schedule options default to None so that mixing them with --history is detectable.
_SCHEDULE_DEFAULTS = {
    "initial": 128,
    "factor": 5.0,
    "delay": 60.0,
    "epochs": 200,
    "n_examples": 50_000,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    net = parser.add_argument_group("network")
    net.add_argument(
        "--network",
        choices=list(sim.NETWORKS),
        default="decentralized-moderate",
        help="preset: network and architecture (default: %(default)s)",
    )
    net.add_argument(
        "--architecture",
        choices=list(sim.ARCHITECTURES),
        help="replace the preset's architecture (with its default overheads)",
    )
    net.add_argument(
        "--bandwidth", type=float, metavar="GBPS", help="replace the preset's bandwidth, in Gb/s"
    )
    net.add_argument(
        "--latency", type=float, metavar="US", help="replace the preset's latency, in microseconds"
    )
    net.add_argument(
        "--overhead",
        type=float,
        metavar="S",
        help="seconds of overhead per update (default: the architecture's)",
    )
    net.add_argument(
        "--overhead-per-worker",
        type=float,
        metavar="S",
        help="seconds of overhead per update and extra worker (default: 0)",
    )
    net.add_argument(
        "--rescale",
        type=float,
        metavar="S",
        help="seconds charged each time the worker count changes (default: 0)",
    )

    run = parser.add_argument_group("run: a recorded history, or a GeoDamp schedule")
    run.add_argument(
        "--history",
        type=Path,
        metavar="FILE",
        help="JSON list of update records with batch_size, or CSV with a batch_size column",
    )
    run.add_argument(
        "--recorded-workers",
        action="store_true",
        help="use the history's 'workers' instead of computing them from the batch size",
    )
    run.add_argument("--initial", type=int, help="initial batch size (default: 128)")
    run.add_argument("--factor", type=float, help="batch size growth per step (default: 5)")
    run.add_argument("--delay", type=float, help="epochs between growth steps (default: 60)")
    run.add_argument("--epochs", type=int, help="epochs (default: 200)")
    run.add_argument("--n-examples", type=int, help="training examples (default: 50000, CIFAR-10)")
    run.add_argument(
        "--max-batch-size",
        type=int,
        help="cap on the batch size; past it the learning rate decays instead",
    )

    model = parser.add_argument_group("model and workers")
    model.add_argument(
        "--seconds-per-example",
        type=float,
        default=sim.T4_SECONDS_PER_EXAMPLE,
        metavar="S",
        help="gradient time per example on one worker "
        "(default: %(default).4g, Wide-ResNet-16-4 on a T4)",
    )
    model.add_argument(
        "--n-params",
        type=int,
        default=sim.WRN_16_4_PARAMS,
        help="model parameters (default: %(default)s)",
    )
    model.add_argument("--bytes-per-param", type=int, default=4, help="(default: %(default)s)")
    model.add_argument(
        "--grads-per-worker",
        type=int,
        default=128,
        help="examples per worker before another is added (default: %(default)s)",
    )
    model.add_argument("--min-workers", type=int, default=1, help="(default: %(default)s)")
    model.add_argument("--max-workers", type=int, help="(default: no cap)")

    parser.add_argument(
        "--paper",
        action="store_true",
        help="print the reproduction of the paper's tables and exit "
        "(only --seconds-per-example and --n-params apply)",
    )


def read_history(path: Path) -> list[dict[str, Any]]:
    """Update records from a JSON list (flat or skorch epochs) or a CSV file."""
    if not path.exists():
        raise ValueError(f"--history: no such file {str(path)!r}.")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "batch_size" not in reader.fieldnames:
                raise ValueError(f"--history: {path} has no 'batch_size' column.")
            rows: list[dict[str, Any]] = []
            for row in reader:
                rec: dict[str, Any] = {"batch_size": int(float(row["batch_size"]))}
                if row.get("workers"):
                    rec["workers"] = int(float(row["workers"]))
                rows.append(rec)
            return rows
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--history: {path} is neither CSV (by its suffix) nor valid JSON: {err}."
        ) from err
    if not isinstance(data, list):
        raise ValueError(f"--history: {path} must hold a JSON list of update records.")
    return [dict(r) for r in sim.update_records(data)]


def _preset(args: argparse.Namespace) -> tuple[str, sim.Network, sim.Architecture]:
    network, arch = sim.resolve(args.network, args.architecture)
    label = args.network
    if args.bandwidth is not None or args.latency is not None:
        network = sim.Network(
            bandwidth_bps=network.bandwidth_bps if args.bandwidth is None else args.bandwidth * 1e9,
            latency_s=network.latency_s if args.latency is None else args.latency * 1e-6,
        )
        label = "custom"
    changes = {
        name: value
        for name, value in (
            ("overhead_s", args.overhead),
            ("overhead_per_worker_s", args.overhead_per_worker),
            ("rescale_s", args.rescale),
        )
        if value is not None
    }
    if changes or args.architecture:
        arch = replace(arch, **changes)
        label = "custom"
    return label, network, arch


def _run_description(args: argparse.Namespace) -> tuple[Any, np.ndarray | None, str]:
    """The updates to simulate, the recorded workers (or None), and a line describing them."""
    given = [name for name in _SCHEDULE_DEFAULTS if getattr(args, name) is not None]
    if args.max_batch_size is not None:
        given.append("max_batch_size")
    if args.history is not None:
        if given:
            flags = ", ".join("--" + g.replace("_", "-") for g in given)
            raise ValueError(f"--history replaces the schedule; drop {flags}.")
        records = read_history(args.history)
        workers = None
        if args.recorded_workers:
            if not all("workers" in r for r in records):
                raise ValueError(
                    "--recorded-workers: some records of the history have no 'workers'."
                )
            workers = np.array([int(r["workers"]) for r in records])
        return records, workers, f"history {args.history} ({len(records):,} updates)"
    if args.recorded_workers:
        raise ValueError("--recorded-workers needs --history.")
    # Any: the options mix ints (initial, epochs, n_examples) and floats (factor, delay).
    opts: dict[str, Any] = {
        name: (getattr(args, name) if getattr(args, name) is not None else default)
        for name, default in _SCHEDULE_DEFAULTS.items()
    }
    # Integral floats become ints so that the damper prints as typed (delay=60, not 60.0).
    delay, factor = (
        int(v) if float(v).is_integer() else v for v in (opts["delay"], opts["factor"])
    )
    damper = GeoDamp(initial=opts["initial"], delay=delay, factor=factor)
    planned = sim.PlannedRun(damper, opts["n_examples"], opts["epochs"], args.max_batch_size)
    cap = (
        "no max batch size"
        if args.max_batch_size is None
        else f"max batch size {args.max_batch_size:,}"
    )
    text = f"{damper!r}, {opts['epochs']} epochs of {opts['n_examples']:,} examples, {cap}"
    return planned, None, text


def format_result(result: sim.SimResult, label: str, run_text: str) -> str:
    """A summary and one row per worker count."""
    net, arch = result.network, result.architecture
    p = result.params
    model_mb = p["n_params"] * p["bytes_per_param"] / 1e6
    lines = [
        f"network:  {label}: {net.describe()}; {arch.describe()}",
        f"overhead: {arch.overhead_s * 1e3:.2f} ms/update + "
        f"{arch.overhead_per_worker_s * 1e3:.2f} ms per extra worker; "
        f"{arch.rescale_s:g} s per rescale",
        f"model:    {p['n_params']:,} parameters x {p['bytes_per_param']} bytes = "
        f"{model_mb:.1f} MB; {p['seconds_per_example'] * 1e3:.4f} ms per example",
        f"run:      {run_text}",
        f"          {result.n_updates:,} updates, {result.examples:,} examples, "
        f"up to {result.max_workers} workers",
        "",
        f"{'workers':>7}{'updates':>10}{'batch sizes':>14}{'s/update':>10}"
        f"{'compute':>10}{'comm':>9}{'overhead':>10}{'minutes':>10}",
    ]
    for w in np.unique(result.workers):
        m = result.workers == w
        b = result.batch_sizes[m]
        sizes = f"{b.min()}" if b.min() == b.max() else f"{b.min()}-{b.max()}"
        lines.append(
            f"{w:>7}{int(m.sum()):>10,}{sizes:>14}{result.update_seconds[m].mean():>10.4f}"
            f"{result.compute_s[m].sum() / 60:>10.2f}{result.communication_s[m].sum() / 60:>9.2f}"
            f"{result.overhead_s[m].sum() / 60:>10.2f}{result.update_seconds[m].sum() / 60:>10.2f}"
        )
    lines.append(
        f"{'total':>7}{result.n_updates:>10,}{'':>14}"
        f"{result.total_seconds / result.n_updates:>10.4f}"
        f"{result.compute_s.sum() / 60:>10.2f}{result.communication_s.sum() / 60:>9.2f}"
        f"{result.overhead_s.sum() / 60:>10.2f}{result.total_minutes:>10.2f}"
    )
    lines += ["", f"total: {result.total_minutes:.2f} minutes ({result.total_seconds:,.1f} s)"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``adadamp simulate``; 0 on success, 2 on bad input."""
    try:
        if args.paper:
            table = paper_table(
                seconds_per_example=args.seconds_per_example, n_params=args.n_params
            )
            print(format_paper_table(table))
            return 0
        label, network, arch = _preset(args)
        updates, workers, run_text = _run_description(args)
        result = sim.simulate_run(
            updates,
            network=network,
            architecture=arch,
            seconds_per_example=args.seconds_per_example,
            n_params=args.n_params,
            bytes_per_param=args.bytes_per_param,
            grads_per_worker=args.grads_per_worker,
            min_workers=args.min_workers,
            max_workers=args.max_workers,
            workers=workers,
        )
    except (ValueError, TypeError) as err:
        print(f"adadamp simulate: error: {err}", file=sys.stderr)
        return 2
    print(format_result(result, label, run_text))
    return 0
