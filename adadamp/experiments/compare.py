"""``adadamp compare``: one model trained under the five Smith et al. schedules and GNSDamp.

Every schedule of :func:`adadamp.experiments.schedules.compare_schedules` (the
five of ``smith_schedules``, and ``GNSDamp``, whose batch size follows the
gradient noise scale) trains
the same model from the same initial weights (per seed) with the same
optimizer: SGD with Nesterov momentum 0.9 and weight decay 5e-4, as in Smith
et al. and the adadamp paper. Per run the skorch history is kept (test
accuracy and loss on a fixed held-out split, training loss, model updates,
examples, wall-clock per epoch), then

- one table is printed: final test accuracy (mean ± std over seeds), model
  updates, examples, measured and simulated wall-clock, max batch size and the
  workers that batch size calls for;
- ``--out`` receives the plots (see :mod:`adadamp.experiments.plots`), the
  histories as CSV and JSON, and ``summary.json``.

With ``--augment`` every schedule trains on random shifts of the training
examples (:class:`~adadamp.experiments.augment.RandomShift`, drawn each time
an example is read) and is tested on the test examples as they are.

The simulated wall-clock (:func:`adadamp.simulate.simulate_run`) is what the
run would take if the workers grew with the batch size, ``grads_per_worker``
being the initial batch size (the paper's setup: 128 examples per worker).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import AUGMENT_SHIFT, RandomShift
from .results import DEFAULT_NETWORK, EPOCH_KEYS, CompareConfig, RunResult
from .runtime import (
    BACKEND_CHOICES,
    DEFAULT_BACKEND,
    TestScoring,
    WallClock,
    dask_client,
    freeze_what_is_held,
    positive_int,
    torch_threads,
    worker_limit,
)
from .schedules import SCHEDULE_NAMES, SmithSchedule, compare_schedules, increase_epochs

# CompareConfig and RunResult live in results.py (the plots read them too);
# they are listed here as the types this module's functions take and return.
__all__ = [
    "CompareConfig",
    "RunResult",
    "SummaryRow",
    "add_arguments",
    "compare",
    "format_table",
    "run",
    "simulated_wall_clock",
    "summarize",
    "write_outputs",
]

#: Shared by every schedule (Smith et al. Sec. 5.1).
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

#: Per data set: initial batch size, learning rate, epochs and ghost batch
#: norm of the default run, tuned over 2 seeds with the five schedules (final
#: test accuracy in %, Dec. LR / Inc. BS / Hybrid*2):
#:
#: - digits (1,437 training images, 20 epochs, no normalization):
#:   initial batch 16, lr 0.025: 97.5 / 97.1 / 97.1; 0.05: 98.1 / 98.1 / 97.5;
#:   0.1: 98.1 / 98.1 / 98.1; 0.2: batch 16 stalls near chance for one seed.
#:   Initial batch 32, lr 0.05: 97.5 / 97.4 / 96.9; 0.1: 98.2 / 98.1 / 97.6;
#:   0.2: 97.4 / 97.1 / 97.6. Batch 32 is the default: half the model updates
#:   (which is what a Dask backend pays for) for the same accuracy.
#: - mnist1d (3,200 training signals, 30 epochs, initial batch 32): without
#:   normalization Hybrid*2 lags (lr 0.025: 92.1 / 91.9 / 83.9; 0.05:
#:   95.6 / 95.8 / 92.2; 0.1: 94.9 / 95.1 / 92.4; 0.2 diverges); with ghost
#:   batch norm over 32 examples, lr 0.05: 96.4 / 96.3 / 94.8 and lr 0.1:
#:   95.9 / 95.8 / 95.2.
#:
#: The learning rates are those whose worst schedule is best. The epochs are
#: enough for Dec. LR's test accuracy to level off.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"batch_size": 32, "lr": 0.1, "epochs": 20, "ghost_batch_size": None},
    "mnist1d": {"batch_size": 32, "lr": 0.1, "epochs": 30, "ghost_batch_size": 32},
}


@dataclass
class SummaryRow:
    """One schedule, over its seeds: a row of the table and of ``summary.json``."""

    schedule: str
    test_accuracy: float
    test_accuracy_std: float
    test_accuracies: list[float]
    final_train_loss: float
    model_updates: int
    examples: int
    wall_clock_s: float
    sim_wall_clock_s: float
    rescale_s: float
    initial_batch_size: int
    max_batch_size: int
    max_workers: int
    max_workers_used: int
    increase_epochs: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Training


def _load(config: CompareConfig) -> tuple[Any, ...]:
    """``(X_train, X_test, y_train, y_test)`` of ``config``'s data set.

    With ``config.augment``, ``X_train`` is a :class:`RandomShift` dataset of
    the training examples and their labels, and ``y_train`` is None.
    """
    from .data import Split, load_digits_dataset, load_mnist1d_dataset

    loaders: dict[str, Callable[..., Split]] = {
        "digits": load_digits_dataset,
        "mnist1d": load_mnist1d_dataset,
    }
    loader = loaders[config.dataset]
    # One fixed split for every run: seeds vary the weights and the order of
    # the examples, schedules are compared on the same test set.
    X_train, X_test, y_train, y_test = loader(seed=0)
    if config.n_train is not None:
        X_train, y_train = X_train[: config.n_train], y_train[: config.n_train]
    if config.augment:
        return RandomShift(X_train, y_train), X_test, None, y_test
    return X_train, X_test, y_train, y_test


def _module(config: CompareConfig) -> type[torch.nn.Module]:
    from .models import MNIST1DCNN, DigitsCNN

    return {"digits": DigitsCNN, "mnist1d": MNIST1DCNN}[config.dataset]


def train_one(
    schedule: SmithSchedule,
    seed: int,
    config: CompareConfig,
    data: Sequence[Any],
    client: Any = None,
) -> RunResult:
    """Train one model under ``schedule`` and return its records."""
    from ..estimators import DaskClassifier

    X_train, X_test, y_train, y_test = data
    ended: list[float] = []  # perf_counter() at each epoch's end
    module_kwargs = {}
    if config.ghost_batch_size is not None:
        module_kwargs["module__ghost_batch_size"] = config.ghost_batch_size
    net = DaskClassifier(
        _module(config),
        **module_kwargs,
        batch_size=schedule.damper,
        max_batch_size=schedule.max_batch_size,
        # The paper's setup: one worker per initial batch, so Dec. LR runs on
        # one worker and a model update takes about the same time throughout.
        grads_per_worker=config.batch_size,
        # A damper that reads the gradient noise scale estimates it from the
        # pieces of the batch: here the slices of b examples that one worker
        # each computes in the paper's setup, on every backend alike.
        worker_max_batch_size=config.batch_size if schedule.damper.needs_grad_stats else None,
        max_workers=worker_limit(config.backend, config.max_workers),
        optimizer=torch.optim.SGD,
        optimizer__momentum=MOMENTUM,
        optimizer__nesterov=True,
        optimizer__weight_decay=WEIGHT_DECAY,
        lr=schedule.lr,
        max_epochs=config.epochs,
        train_split=None,
        callbacks=[("test", TestScoring(X_test, y_test)), ("wall_clock", WallClock(ended))],
        backend=config.backend,
        client=client,
        random_state=seed,
        verbose=0,
    )
    # The same initial weights for every schedule of a seed.
    torch.manual_seed(seed)
    net.initialize()
    freeze_what_is_held()
    # Measured from the fit's start, so that the engine's start, its rescales
    # and its epoch boundaries all count; the shared cluster's start does not.
    began = time.perf_counter()
    net.fit(X_train, y_train)

    epochs: list[dict[str, float]] = []
    updates: list[dict[str, float]] = []
    rescaling = 0.0
    for row, end in zip(net.history, ended):
        rescaling += sum(r["seconds"] for r in row["rescales"])
        epochs.append(
            {
                "epoch": row["epoch"],
                "test_accuracy": row["test_acc"],
                "test_loss": row["test_loss"],
                "train_loss": float(row["train_loss"]),
                "model_updates": row["model_updates"],
                "examples": row["examples"],
                "batch_size": row["batch_size"],
                "lr": row["lr"],
                "workers": row["workers"],
                "wall_clock_s": end - began,
                "rescale_s": rescaling,
            }
        )
        updates.extend(
            {
                "batch_size": u["train_batch_size"],
                "lr": u["lr"],
                "workers": u["workers"],
                "loss": u["train_loss"],
                "duration": u["duration"],
            }
            for u in row["batches"]
        )
    n_params = sum(p.numel() for p in net.module_.parameters())
    return RunResult(
        schedule.name,
        seed,
        epochs,
        updates,
        n_params,
        schedule.initial_batch_size,
        schedule.effective_max_batch_size,
    )


def compare(config: CompareConfig, progress: bool = True) -> list[RunResult]:
    """Train every schedule of ``config`` for every seed.

    One Dask cluster (for a Dask backend) serves all runs. The simulated
    wall-clock is filled in afterwards (:func:`simulated_wall_clock`).
    """
    from tqdm.auto import tqdm

    _check_config(config)
    data = _load(config)
    schedules = [
        s
        for s in compare_schedules(config.epochs, config.batch_size, config.lr)
        if s.name in config.schedules
    ]
    results = []
    bar = tqdm(
        total=len(schedules) * config.seeds, unit="run", disable=not progress, file=sys.stderr
    )
    with (
        bar,
        torch_threads(config.threads),
        dask_client(config.backend, config.max_workers) as client,
    ):
        for seed in range(config.seeds):
            for schedule in schedules:
                bar.set_description(f"{schedule.name}, seed {seed}")
                results.append(train_one(schedule, seed, config, data, client))
                bar.update()
    simulated_wall_clock(results, config)
    return results


def simulated_wall_clock(results: Sequence[RunResult], config: CompareConfig) -> float:
    """Add ``sim_wall_clock_s`` to every epoch record; return seconds per example.

    Each update's compute time is measured once for all runs: the median of
    duration / batch size over the updates of ``config.batch_size`` examples
    (one worker's share in the simulation). The workers follow the batch size,
    ``ceil(B / config.batch_size)`` of them, and the network is
    ``config.network``; see :func:`adadamp.simulate.simulate_run`.
    """
    from ..simulate import simulate_run

    per_example = [
        u["duration"] / u["batch_size"]
        for r in results
        for u in r.updates
        if u["batch_size"] == config.batch_size
    ]
    seconds_per_example = float(np.median(per_example)) if per_example else 0.0
    for r in results:
        sim = simulate_run(
            r.batch_sizes,
            network=config.network,
            seconds_per_example=seconds_per_example,
            n_params=r.n_params,
            grads_per_worker=config.batch_size,
        )
        elapsed = np.cumsum(sim.update_seconds)
        for row in r.epochs:
            row["sim_wall_clock_s"] = float(elapsed[int(row["model_updates"]) - 1])
    return seconds_per_example


# ---------------------------------------------------------------------------
# Summary and outputs


def summarize(results: Sequence[RunResult], config: CompareConfig) -> list[SummaryRow]:
    """One row per schedule, in the order of the schedules, over the seeds."""
    from ..scaling import workers_for

    rows = []
    names = [n for n in SCHEDULE_NAMES if any(r.schedule == n for r in results)]
    for name in names:
        runs = [r for r in results if r.schedule == name]
        last = [r.epochs[-1] for r in runs]
        accs = [float(row["test_accuracy"]) for row in last]
        max_batch = max(int(r.batch_sizes.max()) for r in runs)
        rows.append(
            SummaryRow(
                schedule=name,
                test_accuracy=float(np.mean(accs)),
                test_accuracy_std=float(np.std(accs)),
                test_accuracies=accs,
                final_train_loss=float(np.mean([row["train_loss"] for row in last])),
                model_updates=int(round(np.mean([row["model_updates"] for row in last]))),
                examples=int(round(np.mean([row["examples"] for row in last]))),
                wall_clock_s=float(np.mean([row["wall_clock_s"] for row in last])),
                rescale_s=float(np.mean([row["rescale_s"] for row in last])),
                sim_wall_clock_s=float(np.mean([row["sim_wall_clock_s"] for row in last])),
                initial_batch_size=runs[0].initial_batch_size,
                max_batch_size=max_batch,
                max_workers=workers_for(max_batch, config.batch_size),
                max_workers_used=max(int(u["workers"]) for r in runs for u in r.updates),
                increase_epochs=increase_epochs(config.epochs),
            )
        )
    return rows


def format_table(rows: Sequence[SummaryRow]) -> str:
    """The printed table: one line per schedule."""
    header = (
        "schedule",
        "test acc. (%)",
        "model updates",
        "examples",
        "wall-clock (s)",
        "rescaling (s)",
        "simulated (s)",
        "max batch",
        "max workers",
    )
    lines = [
        (
            r.schedule,
            f"{100 * r.test_accuracy:.1f} ± {100 * r.test_accuracy_std:.1f}",
            f"{r.model_updates:,}",
            f"{r.examples:,}",
            f"{r.wall_clock_s:.2f}",
            f"{r.rescale_s:.2f}",
            f"{r.sim_wall_clock_s:.2f}",
            f"{r.max_batch_size:,}",
            f"{r.max_workers}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return f"{first}  {rest}"

    out = [fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(line) for line in lines]
    return "\n".join(out)


def write_outputs(
    results: Sequence[RunResult],
    rows: Sequence[SummaryRow],
    config: CompareConfig,
    out: Path,
) -> list[Path]:
    """Write plots, histories (CSV, JSON), ``summary.json`` and ``config.json``."""
    from .plots import plot_compare

    out.mkdir(parents=True, exist_ok=True)
    written = []

    csv_path = out / "history.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("schedule", "seed", *EPOCH_KEYS))
        for r in results:
            for row in r.epochs:
                writer.writerow((r.schedule, r.seed, *(row[k] for k in EPOCH_KEYS)))
    written.append(csv_path)

    history_path = out / "history.json"
    history_path.write_text(json.dumps([asdict(r) for r in results], default=_jsonable))
    written.append(history_path)

    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps([asdict(r) for r in rows], indent=2, default=_jsonable))
    written.append(summary_path)

    config_path = out / "config.json"
    config_path.write_text(json.dumps(asdict(config), indent=2))
    written.append(config_path)

    written += plot_compare(results, config, out)
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``adadamp compare`` options to ``parser``."""
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASET_DEFAULTS),
        default="digits",
        help="data set and model: digits (DigitsCNN) or mnist1d (MNIST1DCNN)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs per run (default: digits 20, mnist1d 30)",
    )
    parser.add_argument(
        "--seeds", type=positive_int, default=2, help="runs per schedule, seeds 0..N-1 (default 2)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="initial batch size b; Hybrid*2 starts at 2b (default 32)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="initial learning rate of every schedule (default 0.1)",
    )
    parser.add_argument(
        "--ghost-batch-size",
        type=_non_negative_int,
        default=None,
        help="ghost batch normalization over this many examples; 0 for none "
        "(default: digits none, mnist1d 32)",
    )
    parser.add_argument(
        "--n-train",
        type=positive_int,
        default=None,
        help="train on the first N training examples only (quick checks)",
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=SCHEDULE_NAMES,
        metavar="NAME",
        default=list(SCHEDULE_NAMES),
        help="schedules to run (default: all six)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=DEFAULT_BACKEND,
        help=f"who computes the model updates (default {DEFAULT_BACKEND})",
    )
    parser.add_argument(
        "--max-workers",
        type=positive_int,
        default=None,
        help="most Dask workers of a Dask backend (default: one per CPU core but one, at least 1)",
    )
    from ..simulate import NETWORKS

    parser.add_argument(
        "--network",
        choices=sorted(NETWORKS),
        default=DEFAULT_NETWORK,
        help=f"network preset of the simulated wall-clock (default {DEFAULT_NETWORK})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads in this process (default 1: the models are tiny)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("compare-out"),
        help="folder for plots, histories and summary.json (default compare-out)",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help=f"train on random shifts of up to {AUGMENT_SHIFT} pixel(s) per axis, zero-padded, "
        "drawn every time an example is read; test on the unshifted test set",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    """The :class:`CompareConfig` of parsed command-line options."""
    defaults = DATASET_DEFAULTS[args.dataset]
    return CompareConfig(
        dataset=args.dataset,
        epochs=args.epochs if args.epochs is not None else defaults["epochs"],
        seeds=args.seeds,
        batch_size=args.batch_size if args.batch_size is not None else defaults["batch_size"],
        lr=args.lr if args.lr is not None else defaults["lr"],
        backend=args.backend,
        ghost_batch_size=_ghost(args.ghost_batch_size, defaults["ghost_batch_size"]),
        n_train=args.n_train,
        network=args.network,
        max_workers=args.max_workers,
        threads=args.threads,
        schedules=tuple(n for n in SCHEDULE_NAMES if n in args.schedules),
        augment=args.augment,
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def _ghost(given: int | None, default: int | None) -> int | None:
    # None: the data set's default; 0: no normalization.
    if given is None:
        return default
    return given or None


def run(args: argparse.Namespace) -> int:
    """Run the comparison, print the table and write ``--out``."""
    config = config_from_args(args)
    began = time.perf_counter()
    results = compare(config, progress=not args.no_progress)
    rows = summarize(results, config)
    written = write_outputs(results, rows, config, args.out)
    seconds = time.perf_counter() - began
    print(
        f"{config.dataset}: {config.epochs} epochs, initial batch {config.batch_size}, "
        f"lr {config.lr:g}, batch x5 (or lr / 5) after epochs "
        f"{', '.join(map(str, increase_epochs(config.epochs))) or 'none'}; "
        + (f"ghost batch norm over {config.ghost_batch_size}; " if config.ghost_batch_size else "")
        + (
            f"trained on random shifts of up to {AUGMENT_SHIFT} pixel(s); "
            if config.augment
            else ""
        )
        + f"{config.seeds} seed(s), backend {config.backend}"
    )
    print(format_table(rows))
    used = max(r.max_workers_used for r in rows)
    print(
        f"max workers: ceil(max batch / {config.batch_size}), as the simulation (network "
        f"{config.network}) grows them; this run used at most {used}. "
        "Test accuracy: mean ± std over seeds."
    )
    print(f"wrote {len(written)} files to {args.out} in {seconds:.0f} s")
    return 0


def _check_config(config: CompareConfig) -> None:
    if config.dataset not in DATASET_DEFAULTS:
        raise ValueError(
            f"dataset must be one of {sorted(DATASET_DEFAULTS)}, got {config.dataset!r}."
        )
    if config.backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {config.backend!r}.")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {config.lr!r}.")
    if config.n_train is not None and config.n_train < 2:
        raise ValueError(f"n_train must be >= 2, got {config.n_train!r}.")
    from ..simulate import NETWORKS

    if config.network not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {config.network!r}.")
    unknown = [n for n in config.schedules if n not in SCHEDULE_NAMES]
    if unknown or not config.schedules:
        raise ValueError(
            f"schedules must be a non-empty subset of {SCHEDULE_NAMES}, got {config.schedules!r}."
        )
