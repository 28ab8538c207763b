"""From a damper to the concrete model updates of an epoch, and the max-batch-size rule.

Every engine walks an epoch the same way: one seeded permutation of the
training set, consumed in order, ``batch_size`` examples per update, the last
update of the epoch taking what is left. Keeping that walk here is what lets
the engines agree update for update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .dampers import BaseDamper
from .state import TrainState


@dataclass(frozen=True)
class UpdatePlan:
    """One model update, before it is computed."""

    damping: float
    """The batch size the damper asked for."""
    batch_size: int
    """The batch size used: after the max-batch-size rule and the epoch's end."""
    full_batch_size: int
    """The batch size after the max-batch-size rule only: what workers are sized for,
    so that the short last batch of an epoch does not shrink the cluster."""
    lr_factor: float
    """Multiplies every parameter group's base learning rate."""
    start: int
    """Offset of the update's first example in the epoch's permutation."""


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


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` visits the ``n`` training examples."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def next_update(
    damper: BaseDamper, state: TrainState, max_batch_size: int | None, start: int
) -> UpdatePlan:
    """Plan the update that begins at offset ``start`` of the current epoch."""
    requested = damper.damping(state)
    full, lr_factor = plan_update(requested, max_batch_size, damper.max_batch_size)
    batch_size = min(full, state.n_examples - start)
    return UpdatePlan(float(requested), batch_size, full, lr_factor, start)


def advance(state: TrainState, batch_size: int) -> None:
    """Count one finished update of ``batch_size`` examples."""
    state.model_updates += 1
    state.examples_seen += batch_size


def plan_epochs(
    damper: BaseDamper, n_examples: int, epochs: int, max_batch_size: int | None = None
) -> list[list[UpdatePlan]]:
    """All updates of ``epochs`` epochs for a damper that does not look at the model.

    Used to plan ahead (simulations, engines that submit updates early) and to
    check schedules in tests.
    """
    if damper.adaptive:
        raise ValueError(
            f"{type(damper).__name__} adapts to the model, so its updates cannot be planned ahead."
        )
    state = TrainState(n_examples=n_examples)
    plans = []
    for _ in range(epochs):
        epoch, start = [], 0
        while start < n_examples:
            plan = next_update(damper, state, max_batch_size, start)
            epoch.append(plan)
            advance(state, plan.batch_size)
            start += plan.batch_size
        plans.append(epoch)
    return plans
