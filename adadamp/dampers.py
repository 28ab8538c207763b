"""Batch-size policies ("dampers").

A damper maps the training state to the batch size of the next model update,
the way a ``torch.optim.lr_scheduler`` maps it to a learning rate. Its
constructor only stores parameters; ``validate`` checks them; ``damping``
returns the *requested* batch size. The estimator applies the max-batch-size
rule (:func:`plan_update`) on top, so that a damper never has to know about
the hardware.

Dampers that decay the learning rate instead of growing the batch
(``GeoDampLR``, ``CntsDampLR``) are written as batch dampers with a built-in
``max_batch_size`` equal to their initial batch size: the max-batch-size rule
then turns every requested growth by ``r`` into a learning rate divided by
``r``. One rule serves both families.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any


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

    @property
    def epochs(self) -> float:
        """Epochs completed so far, as a float: examples processed / n."""
        return self.examples_seen / self.n_examples


class BaseDamper:
    """Base class of every batch-size policy.

    Subclasses override :meth:`damping` and, when they have parameters,
    :meth:`validate`. Class attributes tell an engine what to compute:

    - ``needs_loss``: the damper reads ``state.train_loss``, which the engine
      evaluates over the training set whenever :meth:`loss_due` says so.
    - ``needs_grad_stats``: the damper reads ``state.last_loss`` and
      ``state.grad_stats`` of the previous update.
    - ``adaptive``: the batch sizes depend on the model (so an engine cannot
      plan several updates ahead).
    """

    needs_loss: bool = False
    needs_grad_stats: bool = False
    adaptive: bool = False

    @property
    def max_batch_size(self) -> int | None:
        """A cap the damper imposes itself (learning-rate dampers)."""
        return None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when one is out of range."""

    def damping(self, state: TrainState) -> float:
        """The requested batch size of the next update (>= 1, may be fractional)."""
        raise NotImplementedError

    def loss_due(self, state: TrainState) -> bool:
        """Whether ``state.train_loss`` must be refreshed before :meth:`damping`."""
        return False

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, by name (as scikit-learn estimators do)."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: parameters and learned state."""
        return {k: v for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def _check_positive(name: str, value: float, owner: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{owner}: {name} must be a number > 0, got {value!r}.")


class Constant(BaseDamper):
    """A constant batch size: what an ``int`` given as ``batch_size`` becomes."""

    def __init__(self, initial: int = 32):
        self.initial = initial

    def validate(self) -> None:
        if not isinstance(self.initial, int) or isinstance(self.initial, bool) or self.initial < 1:
            raise ValueError(
                f"batch_size must be an int >= 1 or a damper, got {self.initial!r}."
            )

    def damping(self, state: TrainState) -> float:
        return self.initial


class GeoDamp(BaseDamper):
    """Grow the batch size geometrically with the epochs.

    ``B = initial * factor ** floor(e / delay)``, ``e`` the epochs completed.

    Parameters
    ----------
    initial : int, default=128
        Batch size of the first ``delay`` epochs.
    delay : float, default=60
        Epochs between two increases (> 0).
    factor : float, default=5
        Growth per increase (>= 1).
    """

    def __init__(self, initial: int = 128, delay: float = 60, factor: float = 5):
        self.initial = initial
        self.delay = delay
        self.factor = factor

    def validate(self) -> None:
        owner = type(self).__name__
        _check_positive("initial", self.initial, owner)
        _check_positive("delay", self.delay, owner)
        if not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"{owner}: factor must be >= 1, got {self.factor!r}.")

    def damping(self, state: TrainState) -> float:
        # A tiny tolerance keeps epoch boundaries (e == 2.0 exactly) on the right side.
        steps = math.floor(state.epochs / self.delay + 1e-12)
        return self.initial * self.factor**steps


class GeoDampLR(GeoDamp):
    """Decay the learning rate by ``factor`` every ``delay`` epochs; batch stays ``initial``.

    The "decay the learning rate" baseline of Smith et al.: ``GeoDamp``'s
    requested batch size with a built-in cap at ``initial``.
    """

    @property
    def max_batch_size(self) -> int | None:
        return int(self.initial)


def plan_update(
    requested: float, max_batch_size: int | None, damper_cap: int | None = None
) -> tuple[int, float]:
    """Apply the max-batch-size rule to a requested batch size.

    Returns ``(batch_size, lr_factor)``: above the cap the update uses the cap
    and the learning rate is scaled by ``cap / requested`` (Algorithm 1 of the
    adaptive-batch-size work: decaying the learning rate stands in for growing
    the batch). ``requested`` is rounded up to an int first.
    """
    requested_int = max(1, math.ceil(requested - 1e-9))
    caps = [c for c in (max_batch_size, damper_cap) if c is not None]
    cap = min(caps) if caps else None
    if cap is None or requested_int <= cap:
        return requested_int, 1.0
    return int(cap), cap / requested
