"""Figures of the experiments (matplotlib, Agg backend: no display needed).

Every function writes PNG files into a folder and returns their paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The records only, not the runners: compare and synthetic import this module.
from .results import CompareConfig, RunResult, SyntheticRun
from .schedules import schedule_delay

__all__ = ["plot_compare", "plot_synthetic"]

#: One color and line style per schedule, the same in every figure. Line
#: styles tell apart the curves that coincide (Inc. BS and Hybrid inc-2 run
#: identically until the latter's cap).
SCHEDULE_STYLES: dict[str, dict[str, Any]] = {
    "Dec. LR": {"color": "tab:blue", "linestyle": "-"},
    "Hybrid inc-1": {"color": "tab:orange", "linestyle": "--"},
    "Hybrid inc-2": {"color": "tab:green", "linestyle": "-."},
    "Inc. BS": {"color": "tab:red", "linestyle": ":"},
    "Hybrid*2": {"color": "tab:purple", "linestyle": (0, (5, 1, 1, 1, 1, 1))},
    "GNSDamp": {"color": "tab:brown", "linestyle": (0, (1, 1))},
}

#: AdaDamp is drawn last and solid: with as few updates as GD, it lies on
#: GD's curve against model updates.
SYNTHETIC_STYLES: dict[str, dict[str, Any]] = {
    "GD": {"color": "tab:red", "linestyle": "-.", "zorder": 2},
    "SGD": {"color": "tab:green", "linestyle": "-", "zorder": 2},
    "PadaDamp": {"color": "tab:orange", "linestyle": "--", "zorder": 2},
    "AdaDamp": {"color": "tab:blue", "linestyle": "-", "linewidth": 2.2, "zorder": 3},
}

DPI = 120


def _pyplot():
    import matplotlib

    # Agg draws to files only; it works on machines without a display.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _by_schedule(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.schedule, []).append(r)
    return groups


def _stack(runs: Sequence[RunResult], key: str) -> np.ndarray:
    """``runs x epochs`` array of one per-epoch record (runs of equal length)."""
    return np.array([[float(row[key]) for row in r.epochs] for r in runs])


def plot_compare(results: Sequence[RunResult], config: CompareConfig, out: Path) -> list[Path]:
    """The figures of ``adadamp compare``.

    - ``accuracy_loss_vs_epochs.png``, ``..._vs_model_updates.png``,
      ``..._vs_wall_clock.png`` (measured) and ``..._vs_simulated_wall_clock.png``:
      test accuracy (left) and training loss (right), the mean over seeds as
      a line and the range over seeds shaded;
    - ``schedules.png``: batch size and learning rate against epochs.
    """
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    groups = _by_schedule(results)
    seeds = max(len(runs) for runs in groups.values())
    band = f"mean over {seeds} seeds, range shaded" if seeds > 1 else "one seed"
    title = f"{config.dataset}, initial batch {config.batch_size}, lr {config.lr:g} ({band})"
    axes_defs = [
        ("epochs", "epoch", "epochs", "accuracy_loss_vs_epochs.png"),
        ("model_updates", "model updates", "model updates", "accuracy_loss_vs_model_updates.png"),
        (
            "wall_clock_s",
            "measured wall-clock (s)",
            "measured wall-clock (this machine, from each fit's start)",
            "accuracy_loss_vs_wall_clock.png",
        ),
        (
            "sim_wall_clock_s",
            "simulated wall-clock (s)",
            f"simulated wall-clock ({config.network}, workers = batch / {config.batch_size})",
            "accuracy_loss_vs_simulated_wall_clock.png",
        ),
    ]
    written = []
    for x_key, x_label, x_title, filename in axes_defs:
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for name, runs in groups.items():
            style = SCHEDULE_STYLES.get(name, {})
            x = _stack(runs, "epoch" if x_key == "epochs" else x_key).mean(axis=0)
            for ax, key, scale in ((ax_acc, "test_accuracy", 100.0), (ax_loss, "train_loss", 1.0)):
                y = _stack(runs, key) * scale
                ax.plot(x, y.mean(axis=0), label=name, linewidth=1.8, **style)
                if len(runs) > 1:
                    ax.fill_between(
                        x,
                        y.min(axis=0),
                        y.max(axis=0),
                        alpha=0.15,
                        color=style.get("color"),
                        linewidth=0,
                    )
        ax_acc.set_ylabel("test accuracy (%)")
        _zoom_accuracy(ax_acc, results)
        ax_loss.set_ylabel("training loss")
        ax_loss.set_yscale("log")
        for ax in (ax_acc, ax_loss):
            ax.set_xlabel(x_label)
            ax.grid(True, which="major", alpha=0.3)
            if x_key == "epochs":
                ax.xaxis.set_major_locator(_integer_locator())
        ax_acc.legend(loc="lower right")
        fig.suptitle(f"{title}\nagainst {x_title}", fontsize=10)
        path = out / filename
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)

    written.append(_plot_schedules(plt, groups, config, out / "schedules.png"))
    return written


def _zoom_accuracy(ax: Any, results: Sequence[RunResult]) -> None:
    """Show the accuracies that matter: from a bit below the worst final one.

    The first epochs' accuracy can be far lower; without the zoom the
    differences between the schedules at the end would be a few pixels.
    """
    finals = [100.0 * float(r.epochs[-1]["test_accuracy"]) for r in results]
    low = max(0.0, min(finals) - 15.0)
    ax.set_ylim(low, min(100.0, max(finals) + 2.0))


def _plot_schedules(
    plt: Any, groups: Mapping[str, Sequence[RunResult]], config: CompareConfig, path: Path
) -> Path:
    """Batch size (top) and learning rate (bottom), one column per schedule.

    One panel per schedule because several schedules share long stretches
    (all start alike; three share the batch sizes until the first cap), and
    overlaid steps would hide each other.
    """
    names = list(groups)
    fig, axes = plt.subplots(
        2,
        len(names),
        figsize=(2.6 * len(names) + 1, 5.2),
        sharex=True,
        sharey="row",
        squeeze=False,
        constrained_layout=True,
    )
    for col, name in enumerate(names):
        run = groups[name][0]  # the schedule is the same for every seed
        color = SCHEDULE_STYLES.get(name, {}).get("color")
        n = run.epochs[0]["examples"]
        sizes = np.array([u["batch_size"] for u in run.updates], dtype=float)
        lrs = np.array([u["lr"] for u in run.updates], dtype=float)
        # Epochs completed before each update; a step holds until the next one.
        starts = np.concatenate([[0.0], np.cumsum(sizes)[:-1]]) / n
        end = float(len(run.epochs))
        # An epoch's last update takes what is left of it, so it is smaller
        # than the others: the top row shows the largest update per epoch.
        per_epoch = np.array([row["batch_size"] for row in run.epochs], dtype=float)
        edges = np.arange(len(per_epoch) + 1, dtype=float)
        ax_b, ax_lr = axes[0, col], axes[1, col]
        ax_b.step(
            edges, np.append(per_epoch, per_epoch[-1]), where="post", color=color, linewidth=2
        )
        ax_lr.step(
            np.append(starts, end), np.append(lrs, lrs[-1]), where="post", color=color, linewidth=2
        )
        ax_b.set_title(name, fontsize=10)
        ax_lr.set_xlabel("epoch")
        for ax in (ax_b, ax_lr):
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(_integer_locator())
    axes[0, 0].set_ylabel("batch size\n(largest update per epoch)")
    axes[1, 0].set_ylabel("learning rate")
    fig.suptitle(
        f"Schedules: batch x5 (past the cap: lr / 5) every {_delay_text(config)}; "
        f"initial batch {config.batch_size} (Hybrid*2: {2 * config.batch_size}), "
        f"initial lr {config.lr:g}",
        fontsize=10,
    )
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _delay_text(config: CompareConfig) -> str:
    delay = schedule_delay(config.epochs)
    return f"{delay} epoch" + ("s" if delay != 1 else "")


def plot_synthetic(
    runs: Sequence[SyntheticRun],
    least_squares_loss: float,
    out: Path,
    threshold: float | None = None,
) -> list[Path]:
    """Training loss against model updates and against examples processed.

    Writes ``synthetic_loss_vs_model_updates.png`` and
    ``synthetic_loss_vs_examples.png``; the test loss of the least-squares
    solution is a dashed line, the threshold of the summary table a dotted one.
    """
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x_key, x_label, filename in (
        ("model_updates", "model updates", "synthetic_loss_vs_model_updates.png"),
        ("examples", "examples processed", "synthetic_loss_vs_examples.png"),
    ):
        fig, ax = plt.subplots(figsize=(8.4, 4.4), constrained_layout=True)
        for run in runs:
            style = SYNTHETIC_STYLES.get(run.name, {})
            # Update 0 (nothing processed yet) has no place on a log axis.
            keep = run.curve[x_key] > 0
            ax.plot(
                run.curve[x_key][keep],
                run.curve["train_loss"][keep],
                label=run.name,
                **{"linewidth": 1.8, **style},
            )
        ax.axhline(
            least_squares_loss,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label="least squares (test loss)",
        )
        if threshold is not None:
            ax.axhline(
                threshold,
                color="gray",
                linestyle=":",
                linewidth=1.0,
                label=f"threshold {threshold:.3g}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{x_label} (log scale)")
        ax.set_ylabel("training loss (mean squared error)")
        ax.grid(True, which="major", alpha=0.3)
        # Outside the axes: inside, every corner holds a curve or a reference line.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
        ax.set_title(f"Linear network: training loss against {x_label}", fontsize=10)
        path = out / filename
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        written.append(path)
    return written
