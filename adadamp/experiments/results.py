"""The records that the experiment runners write and the figures draw.

Kept apart from the runners so that :mod:`~adadamp.experiments.plots`
imports none of them: :mod:`~adadamp.experiments.compare` and
:mod:`~adadamp.experiments.synthetic` fill these records in and call the
plots, and the plots read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .runtime import DEFAULT_BACKEND
from .schedules import SCHEDULE_NAMES

__all__ = ["DEFAULT_NETWORK", "EPOCH_KEYS", "CompareConfig", "RunResult", "SyntheticRun"]

#: The network of the simulated wall-clock (a preset of adadamp.simulate.NETWORKS).
DEFAULT_NETWORK = "decentralized-moderate"


@dataclass(frozen=True)
class CompareConfig:
    """What ``adadamp compare`` runs (its command-line options)."""

    dataset: str = "digits"
    epochs: int = 20
    seeds: int = 2
    batch_size: int = 32
    lr: float = 0.1
    backend: str = DEFAULT_BACKEND
    ghost_batch_size: int | None = None
    n_train: int | None = None
    network: str = DEFAULT_NETWORK
    max_workers: int | None = None
    threads: int | None = 1
    schedules: tuple[str, ...] = SCHEDULE_NAMES
    #: Train on random shifts of the training examples, drawn per use
    #: (:class:`~adadamp.experiments.augment.RandomShift`); test as they are.
    augment: bool = False


@dataclass
class RunResult:
    """One (schedule, seed) run of ``adadamp compare``.

    ``epochs`` holds one dict per epoch (see :data:`EPOCH_KEYS`);
    ``updates`` one dict per model update (batch size, learning rate,
    workers, loss, duration in seconds).
    """

    schedule: str
    seed: int
    epochs: list[dict[str, float]]
    updates: list[dict[str, float]]
    n_params: int
    initial_batch_size: int
    max_batch_size: int | None

    @property
    def batch_sizes(self) -> np.ndarray:
        return np.array([u["batch_size"] for u in self.updates], dtype=np.int64)


#: The per-epoch record of a run, in CSV column order.
EPOCH_KEYS = (
    "epoch",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "model_updates",
    "examples",
    "batch_size",
    "lr",
    "workers",
    "wall_clock_s",
    "rescale_s",
    "sim_wall_clock_s",
)


@dataclass
class SyntheticRun:
    """One method's training curve in the synthetic experiment.

    ``curve`` maps ``"model_updates"``, ``"examples"`` and ``"train_loss"``
    to arrays: the training loss after that many updates and examples.
    """

    name: str
    curve: dict[str, np.ndarray]
    model_updates: int
    examples: int
    seconds: float

    def first_reach(self, threshold: float) -> tuple[int, int] | None:
        """``(model updates, examples)`` when the loss first fell to ``threshold``, or None."""
        hits = np.flatnonzero(self.curve["train_loss"] <= threshold)
        if hits.size == 0:
            return None
        i = int(hits[0])
        return int(self.curve["model_updates"][i]), int(self.curve["examples"][i])
