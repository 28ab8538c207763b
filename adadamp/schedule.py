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
from .gns import lr_gain
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
    progress: float = 0.0
    """Examples the update counts for on the progress clock (``TrainState.progress``):
    its batch size, or with ``lr_scaling="adascale"`` its gain times the base batch size."""


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


def base_batch_size(damper: BaseDamper, n_examples: int) -> int:
    """``B0``, the batch size the learning-rate scaling rules are relative to.

    The damper's ``initial`` batch size (rounded as :func:`plan_update` rounds
    a request), or the training-set size for a damper without one
    (``GradientDescent``): at ``B0`` every rule leaves the learning rate as given.
    """
    initial = getattr(damper, "initial", None)
    return n_examples if initial is None else max(1, math.ceil(initial - 1e-9))


def next_update(
    damper: BaseDamper,
    state: TrainState,
    max_batch_size: int | None,
    start: int,
    lr_scaling: str = "none",
) -> UpdatePlan:
    """Plan the update that begins at offset ``start`` of the current epoch.

    The learning-rate factor is the max-batch-size rule's times the gain of
    ``lr_scaling`` (:func:`adadamp.gns.lr_gain`) at the batch size used,
    relative to :func:`base_batch_size`.
    """
    requested = damper.damping(state)
    full, lr_factor = plan_update(requested, max_batch_size, damper.max_batch_size)
    batch_size = min(full, state.n_examples - start)
    base = base_batch_size(damper, state.n_examples)
    gain = lr_gain(lr_scaling, batch_size, base, state.grad_stats)
    progress = gain * base if lr_scaling == "adascale" else float(batch_size)
    return UpdatePlan(
        float(requested), batch_size, full, lr_factor * gain, start, progress=progress
    )


def advance(state: TrainState, batch_size: int, progress: float | None = None) -> None:
    """Count one finished update of ``batch_size`` examples.

    ``progress`` (default: ``batch_size``) is what the update adds to the
    progress clock, in examples (see ``UpdatePlan.progress``).
    """
    state.model_updates += 1
    state.examples_seen += batch_size
    state.progress_examples += batch_size if progress is None else progress


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
