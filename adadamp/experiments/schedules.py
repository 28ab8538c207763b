"""The batch-size and learning-rate schedules of Smith et al. (2017), Sec. 5.1.

Smith et al. train for 200 epochs and, at epochs 60, 120 and 180, either
divide the learning rate by 5 or multiply the batch size by 5. The paper that
reproduces them with adadamp (CIFAR-10, initial batch 128) compares five
schedules, named here as in its figures:

==============  ===========================  =====================  ==========
name            damper                       max batch size         paper row
==============  ===========================  =====================  ==========
Dec. LR         ``GeoDampLR(b)``             ``b`` (its own cap)    128
Hybrid inc-1    ``GeoDamp(b)``               ``5 b``                640
Hybrid inc-2    ``GeoDamp(b)``               ``25 b``               3.2k
Inc. BS         ``GeoDamp(b)``               none                   16k
Hybrid*2        ``GeoDamp(2 b)``             ``40 b = 20 (2 b)``    5.1k (*2)
==============  ===========================  =====================  ==========

Past its max batch size a schedule keeps the batch size at the cap and
divides the learning rate by what the batch would have grown by (the
max-batch-size rule of :func:`adadamp.schedule.plan_update`), so every
schedule reduces the gradient noise by the same factor 5 at the same epochs.

*Hybrid*2.* The paper's row starts at 256 and caps the batch at 5,120, that
is 20 times its initial batch (not a power of 5): the batch grows 256 ->
1,280 at epoch 60, and at epoch 120 the requested 6,400 is held at 5,120 with
the learning rate times 0.8, then times 0.16 at epoch 180. Here the same
ratio is kept: initial batch ``2 b``, max batch size ``20 * 2 b = 40 b``.

*Scaling to fewer epochs.* The increases come at fixed fractions of the run,
60/200, 120/200 and 180/200. :class:`~adadamp.dampers.GeoDamp` grows every
``delay`` epochs, so the fractions are realised as ``delay = max(1,
round(0.3 * epochs))``: increases at ``delay``, ``2 delay`` and ``3 delay``
(whole epochs, at least one epoch apart). A fourth increase would come at
``4 delay``, and ``4 * max(1, round(0.3 E)) >= E`` for every ``E >= 1`` (for
``E >= 10`` since ``round(0.3 E) >= 0.3 E - 0.5``; below that by checking each
value), so it never falls inside the run: the number of increases is capped at
three by the choice of ``delay`` alone. :func:`smith_schedules` checks this
and raises if it ever failed, rather than silently adding a fourth increase.
For short runs fewer than three increases fit (two epochs: one increase, at
epoch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dampers import BaseDamper, GeoDamp, GeoDampLR, GNSDamp

__all__ = [
    "FACTOR",
    "GNS_KAPPA",
    "INCREASE_FRACTION",
    "SCHEDULE_NAMES",
    "SMITH_NAMES",
    "SmithSchedule",
    "compare_schedules",
    "gns_schedule",
    "increase_epochs",
    "schedule_delay",
    "smith_schedules",
]

#: Growth of the batch size (or division of the learning rate) per increase.
FACTOR = 5

#: Smith et al.'s first increase comes at epoch 60 of 200; the others follow
#: at the same period (120, 180).
INCREASE_FRACTION = 60 / 200

#: The Smith et al. schedule names, in the order of the paper's figures.
SMITH_NAMES = ("Dec. LR", "Hybrid inc-1", "Hybrid inc-2", "Inc. BS", "Hybrid*2")

#: Every row of ``adadamp compare``: the Smith et al. schedules, then the
#: batch size that follows the gradient noise scale.
SCHEDULE_NAMES = (*SMITH_NAMES, "GNSDamp")

#: ``GNSDamp``'s ``kappa`` in ``adadamp compare``, one value for both data
#: sets (see the README's table for what it was chosen from).
GNS_KAPPA = 1.0

#: Most increases a schedule makes, as in Smith et al.
MAX_INCREASES = 3


@dataclass(frozen=True)
class SmithSchedule:
    """One named schedule of the comparison: what to pass to the estimator.

    Attributes
    ----------
    name : str
        The label of the paper's figures (e.g. ``"Inc. BS"``).
    damper : BaseDamper
        The estimator's ``batch_size``: a :class:`~adadamp.dampers.GeoDamp`
        (or its subclass :class:`~adadamp.dampers.GeoDampLR`), or for the
        ``"GNSDamp"`` row a :class:`~adadamp.dampers.GNSDamp`.
    max_batch_size : int or None
        The estimator's ``max_batch_size``; ``None`` for no cap.
    lr : float
        The initial learning rate (the estimator's ``lr``).
    """

    name: str
    damper: BaseDamper
    max_batch_size: int | None
    lr: float

    @property
    def initial_batch_size(self) -> int:
        """Batch size of the first update."""
        # Every damper of the comparison has one (GeoDamp, GeoDampLR, GNSDamp).
        initial = getattr(self.damper, "initial", None)
        assert initial is not None, f"{self.name}: its damper has no initial batch size"
        return int(initial)

    @property
    def effective_max_batch_size(self) -> int | None:
        """The cap that applies, the damper's own included (``None``: no cap)."""
        caps = [c for c in (self.max_batch_size, self.damper.max_batch_size) if c is not None]
        return min(caps) if caps else None


def schedule_delay(epochs: int) -> int:
    """Epochs between two increases for a run of ``epochs`` epochs.

    ``max(1, round(0.3 * epochs))``: Smith et al.'s 60 of 200, in whole epochs.
    """
    _check_epochs(epochs)
    return max(1, round(INCREASE_FRACTION * epochs))


def increase_epochs(epochs: int) -> list[int]:
    """The epochs (completed) after which the batch grows, within a run of ``epochs``.

    Examples
    --------
    >>> increase_epochs(200)
    [60, 120, 180]
    >>> increase_epochs(20)
    [6, 12, 18]
    >>> increase_epochs(2)
    [1]
    """
    delay = schedule_delay(epochs)
    return [k * delay for k in range(1, MAX_INCREASES + 1) if k * delay < epochs]


def smith_schedules(
    epochs: int, initial_batch_size: int = 128, lr: float = 0.05
) -> list[SmithSchedule]:
    """The five schedules of Smith et al. Sec. 5.1, scaled to ``epochs`` epochs.

    Parameters
    ----------
    epochs : int
        Length of the run; the increases come at ``delay``, ``2 delay`` and
        ``3 delay`` epochs with ``delay = schedule_delay(epochs)``.
    initial_batch_size : int, default=128
        ``b``, the initial batch size of every schedule but Hybrid*2 (``2 b``).
    lr : float, default=0.05
        The initial learning rate, shared by all schedules (the paper's 0.05).

    Returns
    -------
    list of SmithSchedule
        In the order of :data:`SCHEDULE_NAMES`.
    """
    _check_epochs(epochs)
    if (
        isinstance(initial_batch_size, bool)
        or not isinstance(initial_batch_size, int)
        or initial_batch_size < 1
    ):
        raise ValueError(f"initial_batch_size must be an int >= 1, got {initial_batch_size!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}.")
    delay = schedule_delay(epochs)
    if (MAX_INCREASES + 1) * delay < epochs:  # pragma: no cover - see the module docstring
        raise AssertionError(f"delay={delay} would allow a fourth increase within {epochs} epochs.")
    b = initial_batch_size

    def geo(initial: int) -> GeoDamp:
        return GeoDamp(initial=initial, delay=delay, factor=FACTOR)

    return [
        SmithSchedule("Dec. LR", GeoDampLR(initial=b, delay=delay, factor=FACTOR), None, lr),
        SmithSchedule("Hybrid inc-1", geo(b), b * FACTOR, lr),
        SmithSchedule("Hybrid inc-2", geo(b), b * FACTOR**2, lr),
        SmithSchedule("Inc. BS", geo(b), None, lr),
        # The paper's 5.1k (*2) row: 256 -> cap 5,120, i.e. 20 times the initial batch.
        SmithSchedule("Hybrid*2", geo(2 * b), 2 * b * 20, lr),
    ]


def gns_schedule(initial_batch_size: int = 128, lr: float = 0.05) -> SmithSchedule:
    """The ``"GNSDamp"`` row: :class:`~adadamp.dampers.GNSDamp` from ``b``, no cap.

    Its batch size follows ``GNS_KAPPA`` times the gradient noise scale
    (never shrinking, at least doubling per change); the learning rate stays
    ``lr``, as in Inc. BS.
    """
    return SmithSchedule("GNSDamp", GNSDamp(initial=initial_batch_size, kappa=GNS_KAPPA), None, lr)


def compare_schedules(
    epochs: int, initial_batch_size: int = 128, lr: float = 0.05
) -> list[SmithSchedule]:
    """Every row of ``adadamp compare``, in the order of :data:`SCHEDULE_NAMES`."""
    return [*smith_schedules(epochs, initial_batch_size, lr), gns_schedule(initial_batch_size, lr)]


def _check_epochs(epochs: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}.")
