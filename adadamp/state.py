"""The training state a damper reads: counters and the last update's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _plain_float(value: Any) -> float | None:
    # Saved histories are JSON, which takes Python floats but not NumPy or torch scalars.
    return None if value is None else float(value)


@dataclass
class TrainState:
    """What a damper may look at before choosing the next batch size.

    Engines own one of these per fit and advance it after every update.
    """

    n_examples: int
    model_updates: int = 0
    examples_seen: int = 0
    last_loss: float | None = None
    """Mean loss of the previous update's batch (None before the first)."""
    grad_stats: dict[str, float] = field(default_factory=dict)
    """Scalars reduced alongside the previous update's gradient (see engines)."""
    train_loss: float | None = None
    """Mean loss over the training set, refreshed when ``damper.loss_due``."""
    progress_examples: float = 0.0
    """The progress clock, in examples: ``examples_seen``, except with
    ``lr_scaling="adascale"``, where each update counts its gain times the base
    batch size (AdaScale's scale-invariant iterations, in examples)."""

    @property
    def epochs(self) -> float:
        """Epochs completed so far, as a float: examples processed / n."""
        return self.examples_seen / self.n_examples

    @property
    def progress(self) -> float:
        """The progress clock in epochs: ``progress_examples / n``."""
        return self.progress_examples / self.n_examples

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON values (``examples`` is ``examples_seen``)."""
        return {
            "n_examples": int(self.n_examples),
            "model_updates": int(self.model_updates),
            "examples": int(self.examples_seen),
            "last_loss": _plain_float(self.last_loss),
            "grad_stats": {k: float(v) for k, v in self.grad_stats.items()},
            "train_loss": _plain_float(self.train_loss),
            "progress": float(self.progress_examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; keys it lacks keep their defaults."""
        self.n_examples = int(state.get("n_examples", self.n_examples))
        self.model_updates = int(state["model_updates"])
        self.examples_seen = int(state["examples"])
        self.last_loss = state.get("last_loss")
        self.grad_stats = dict(state.get("grad_stats") or {})
        self.train_loss = state.get("train_loss")
        self.progress_examples = float(state.get("progress", self.examples_seen))
