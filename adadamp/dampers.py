"""Batch-size policies ("dampers").

A damper maps the training state to the batch size of the next model update,
the way a ``torch.optim.lr_scheduler`` maps it to a learning rate. Its
constructor only stores parameters; ``validate`` checks them; ``damping``
returns the *requested* batch size. The epoch walk applies the max-batch-size
rule (:func:`adadamp.schedule.plan_update`) on top, so that a damper never has
to know about the hardware.

Dampers that decay the learning rate instead of growing the batch
(``GeoDampLR``, ``CntsDampLR``) are written as batch dampers with a built-in
``max_batch_size`` equal to their initial batch size: the max-batch-size rule
then turns every requested growth by ``r`` into a learning rate divided by
``r``. One rule serves both families.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

from ._checks import check_at_least, check_finite, check_int_at_least, check_positive, is_real
from .state import TrainState


def _param_names(cls: type[BaseDamper]) -> list[str]:
    """Constructor parameters of a damper class, in signature order."""
    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


class BaseDamper:
    """Base class of every batch-size policy.

    Subclasses override :meth:`damping` and, when they have parameters,
    :meth:`validate`. Class attributes tell an engine what to compute:

    - ``needs_loss``: the damper reads ``state.train_loss``, which the engine
      evaluates over the training set whenever :meth:`loss_due` says so.
    - ``needs_grad_stats``: the damper reads ``state.last_loss`` and
      ``state.grad_stats`` of the previous update.
    - ``needs_grad_norm``: with ``needs_grad_stats``, it reads
      ``grad_stats["grad_sq_norm"]`` after every update. Otherwise a lone rank
      computes the statistics only on the updates that estimate the noise
      scale (:func:`adadamp.engines._step.stats_span`).
    - ``adaptive``: the batch sizes depend on the model (so an engine cannot
      plan several updates ahead).
    - ``loss_fraction``: with ``needs_loss``, the share of the training set
      the loss is estimated on (1: all of it).

    These, :meth:`damping`, :meth:`loss_due`, ``max_batch_size`` and
    :meth:`state_dict`/:meth:`load_state_dict` are all an engine reads: a
    wrapper around a damper must pass them on.

    Following scikit-learn, constructor parameters are stored under their own
    names and learned state under names ending in ``_``; both go into
    :meth:`state_dict`.
    """

    needs_loss: bool = False
    needs_grad_stats: bool = False
    needs_grad_norm: bool = False
    adaptive: bool = False
    loss_fraction: float = 1.0
    """With ``needs_loss``: the fraction of the training set the loss is estimated on."""

    @classmethod
    def param_names(cls) -> list[str]:
        """Constructor parameters, in signature order: what ``batch_size__*`` may set."""
        return _param_names(cls)

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
        return {name: getattr(self, name) for name in _param_names(type(self))}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: parameters and learned state."""
        # A copy, so that a saved state does not change when training goes on.
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (parameters included)."""
        vars(self).update(copy.deepcopy(dict(state)))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def _lr_cap(initial: float) -> int:
    # Rounded the way plan_update rounds a request, so that the first update
    # of a learning-rate damper runs at the full learning rate.
    return max(1, math.ceil(initial - 1e-9))


# ---------------------------------------------------------------------------
# Schedules: pure functions of the state.


class Constant(BaseDamper):
    """A constant batch size: what an ``int`` given as ``batch_size`` becomes.

    ``B = initial``.

    Parameters
    ----------
    initial : int, default=32
        The batch size of every update (>= 1).
    """

    def __init__(self, initial: int = 32):
        self.initial = initial

    def validate(self) -> None:
        check_int_at_least("initial", self.initial, 1, type(self).__name__)

    def damping(self, state: TrainState) -> float:
        return self.initial


class GeoDamp(BaseDamper):
    """Grow the batch size geometrically with the epochs.

    ``B = initial * factor ** floor(e / delay)``, ``e`` the epochs completed
    (a float: examples processed / n).

    Parameters
    ----------
    initial : int, default=128
        Batch size of the first ``delay`` epochs (> 0).
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
        check_positive("initial", self.initial, owner)
        check_positive("delay", self.delay, owner)
        check_at_least("factor", self.factor, 1, owner)

    def damping(self, state: TrainState) -> float:
        # A tiny tolerance keeps epoch boundaries (e == 2.0 exactly) on the right side.
        steps = math.floor(state.epochs / self.delay + 1e-12)
        return self.initial * self.factor**steps


class GeoDampLR(GeoDamp):
    """Decay the learning rate by ``factor`` every ``delay`` epochs; batch stays ``initial``.

    The "decay the learning rate" baseline of Smith et al.: ``GeoDamp``'s
    requested batch size ``initial * factor ** floor(e / delay)`` with a
    built-in cap at ``initial``, so the update uses ``B = initial`` and the
    learning rate is multiplied by ``factor ** -floor(e / delay)``.

    Parameters
    ----------
    initial : int, default=128
        The batch size of every update (> 0).
    delay : float, default=60
        Epochs between two decays (> 0).
    factor : float, default=5
        Division of the learning rate per decay (>= 1).
    """

    @property
    def max_batch_size(self) -> int | None:
        return _lr_cap(self.initial)


class PadaDamp(BaseDamper):
    """Grow the batch size linearly with the model updates.

    ``B = ceil(initial + rate * k)``, ``k`` the model updates done so far.

    Parameters
    ----------
    initial : int, default=32
        Batch size of the first update (> 0).
    rate : float, default=1.0
        Examples added per model update (>= 0).
    """

    def __init__(self, initial: int = 32, rate: float = 1.0):
        self.initial = initial
        self.rate = rate

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive("initial", self.initial, owner)
        check_at_least("rate", self.rate, 0, owner)

    def damping(self, state: TrainState) -> float:
        # plan_update takes the ceiling.
        return self.initial + self.rate * state.model_updates


class CntsDampLR(BaseDamper):
    """Keep the batch size and decay the learning rate like ``1 / k``.

    Written as a request for ``initial * (1 + rate * k)`` examples with a
    built-in cap at ``initial``: the update uses ``B = initial`` and the
    learning rate is multiplied by ``1 / (1 + rate * k)``, ``k`` the model
    updates done so far.

    Parameters
    ----------
    initial : int, default=32
        The batch size of every update (> 0).
    rate : float, default=0.01
        Decay speed (>= 0); 0 keeps the learning rate constant.
    """

    def __init__(self, initial: int = 32, rate: float = 0.01):
        self.initial = initial
        self.rate = rate

    @property
    def max_batch_size(self) -> int | None:
        return _lr_cap(self.initial)

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive("initial", self.initial, owner)
        check_at_least("rate", self.rate, 0, owner)

    def damping(self, state: TrainState) -> float:
        return self.initial * (1 + self.rate * state.model_updates)


class GradientDescent(BaseDamper):
    """Full-batch gradient descent: one update per epoch.

    ``B = n``, the number of training examples.
    """

    def __init__(self) -> None:
        pass

    def damping(self, state: TrainState) -> float:
        return state.n_examples


# ---------------------------------------------------------------------------
# Adaptive dampers: the batch size follows the model.


class AdaDamp(BaseDamper):
    """Grow the batch size as the training loss falls (Algorithm 1 of AdaDamp).

    ``B = ceil(initial * (F0 - F*) / (Fk - F*))``, where ``Fk`` is the mean
    loss over the training set at update ``k``, ``F0`` the first one seen and
    ``F*`` is ``best_loss``. The engine evaluates ``Fk`` (on a fraction
    ``loss_fraction`` of the training set) only when ``k % dwell == 0``;
    between two evaluations the batch size is held.

    If ``Fk - F*`` is not a positive finite number (the loss reached
    ``best_loss``, or is NaN/infinite) the formula has no meaningful value,
    and the previous batch size is held. ``F0 <= F*`` raises ``ValueError``:
    ``best_loss`` must lie below the initial loss.

    Parameters
    ----------
    initial : int, default=32
        Batch size while the loss equals the initial loss (> 0).
    dwell : int, default=1
        Model updates between two evaluations of the training loss (>= 1).
    best_loss : float, default=0.0
        ``F*``, a lower bound of the training loss (0 for most losses).
    loss_fraction : float, default=1.0
        Fraction of the training set over which ``Fk`` is estimated, in (0, 1].

    Attributes
    ----------
    initial_loss_ : float or None
        ``F0``, the first training loss seen.
    batch_size_ : float or None
        The batch size requested at the last evaluation.
    """

    needs_loss = True
    adaptive = True

    def __init__(
        self,
        initial: int = 32,
        dwell: int = 1,
        best_loss: float = 0.0,
        loss_fraction: float = 1.0,
    ):
        self.initial = initial
        self.dwell = dwell
        self.best_loss = best_loss
        self.loss_fraction = loss_fraction
        self.initial_loss_: float | None = None
        self.batch_size_: float | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive("initial", self.initial, owner)
        check_int_at_least("dwell", self.dwell, 1, owner)
        check_finite("best_loss", self.best_loss, owner)
        if not (is_real(self.loss_fraction) and 0 < self.loss_fraction <= 1):
            raise ValueError(
                f"{owner}: loss_fraction must be in (0, 1], got {self.loss_fraction!r}."
            )

    def loss_due(self, state: TrainState) -> bool:
        return state.model_updates % self.dwell == 0

    def damping(self, state: TrainState) -> float:
        if self.batch_size_ is not None and not self.loss_due(state):
            return self.batch_size_
        loss = state.train_loss
        if loss is None:
            raise RuntimeError(
                f"{type(self).__name__} needs state.train_loss at update "
                f"{state.model_updates}, and the engine did not evaluate it."
            )
        if self.initial_loss_ is None:
            if not (is_real(loss) and loss > self.best_loss):
                raise ValueError(
                    f"{type(self).__name__}: best_loss ({self.best_loss!r}) must be below "
                    f"the initial training loss ({loss!r}); lower best_loss."
                )
            self.initial_loss_ = float(loss)
        gap = loss - self.best_loss
        if is_real(gap) and gap > 0:
            self.batch_size_ = self.initial * (self.initial_loss_ - self.best_loss) / gap
        # Otherwise hold the last batch size (see the class docstring).
        return self.initial if self.batch_size_ is None else self.batch_size_


class RadaDamp(BaseDamper):
    """AdaDamp without passes over the training set: follow a moving average.

    Each update adds its signal ``x_k`` to an exponential moving average,
    ``m_k = rho * m_{k-1} + (1 - rho) * x_k`` (the first average is ``x_1``
    itself). The signal is the previous update's batch loss
    (``signal="loss"``) or the squared norm of its mean gradient
    (``signal="grad_norm"``). Then

    - ``signal="loss"``: ``B = ceil(initial * m0 / (m_k - F*))``, with
      ``m0 = m_1 - F*`` and ``F* = best_loss``;
    - ``signal="grad_norm"``: ``B = ceil(initial * m0 / m_k)``, with
      ``m0 = m_1``.

    Before the first update there is no signal and ``B = initial``. If the
    denominator is not a positive finite number the previous batch size is
    held, and a non-finite signal is left out of the average. ``m0 <= 0``
    raises ``ValueError``.

    Parameters
    ----------
    initial : int, default=32
        Batch size of the first updates (> 0).
    rho : float, default=0.9
        Weight of the past in the moving average, in [0, 1); 0 uses the last
        signal alone.
    best_loss : float, default=0.0
        ``F*``, a lower bound of the loss (``signal="loss"`` only).
    signal : {"loss", "grad_norm"}, default="loss"
        What the moving average follows.

    Attributes
    ----------
    average_ : float or None
        ``m_k``, the moving average of the signal.
    initial_gap_ : float or None
        ``m0``.
    batch_size_ : float or None
        The batch size requested at the last update.
    updates_seen_ : int or None
        The update count whose signal was last added (so that calling
        :meth:`damping` twice for one update counts its signal once).
    """

    needs_grad_stats = True
    adaptive = True
    signals = ("loss", "grad_norm")

    def __init__(
        self,
        initial: int = 32,
        rho: float = 0.9,
        best_loss: float = 0.0,
        signal: str = "loss",
    ):
        self.initial = initial
        self.rho = rho
        self.best_loss = best_loss
        self.signal = signal
        self.average_: float | None = None
        self.initial_gap_: float | None = None
        self.batch_size_: float | None = None
        self.updates_seen_: int | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive("initial", self.initial, owner)
        if not (is_real(self.rho) and 0 <= self.rho < 1):
            raise ValueError(f"{owner}: rho must be in [0, 1), got {self.rho!r}.")
        check_finite("best_loss", self.best_loss, owner)
        if self.signal not in self.signals:
            raise ValueError(
                f"{owner}: signal must be one of {', '.join(map(repr, self.signals))}, "
                f"got {self.signal!r}."
            )

    @property
    def needs_grad_norm(self) -> bool:  # type: ignore[override]
        return self.signal == "grad_norm"

    def _read_signal(self, state: TrainState) -> float | None:
        if state.last_loss is None:
            return None  # no update yet (or a resumed state without one)
        if self.signal == "loss":
            return state.last_loss
        if "grad_sq_norm" not in state.grad_stats:
            raise RuntimeError(
                f"{type(self).__name__}(signal='grad_norm') needs "
                "state.grad_stats['grad_sq_norm'], and the engine did not provide it."
            )
        return state.grad_stats["grad_sq_norm"]

    def damping(self, state: TrainState) -> float:
        value = self._read_signal(state)
        if value is not None and state.model_updates != self.updates_seen_ and is_real(value):
            self.updates_seen_ = state.model_updates
            if self.average_ is None:
                self.average_ = float(value)
            else:
                self.average_ = self.rho * self.average_ + (1 - self.rho) * value
            offset = self.best_loss if self.signal == "loss" else 0.0
            gap = self.average_ - offset
            if self.initial_gap_ is None:
                if not gap > 0:
                    raise ValueError(
                        f"{type(self).__name__}: the first {self.signal} signal "
                        f"({self.average_!r}) must exceed "
                        + ("best_loss; lower best_loss." if self.signal == "loss" else "0.")
                    )
                self.initial_gap_ = gap
            if is_real(gap) and gap > 0:
                self.batch_size_ = self.initial * self.initial_gap_ / gap
        return self.initial if self.batch_size_ is None else self.batch_size_


class GNSDamp(BaseDamper):
    """Follow the gradient noise scale: ``B = clip(kappa * B_simple, B_current, limit)``.

    ``B_simple = tr(Sigma) / |G|^2`` is the simple noise scale of McCandlish
    et al. (2018), the batch size beyond which a larger batch buys little
    per example. The engines estimate it at no extra pass from the pieces of
    every update's gradient and smooth it (``state.grad_stats["gns_b_simple"]``,
    see :mod:`adadamp.gns`); nothing is tuned to the problem but ``kappa``.

    The batch size never shrinks, and changes only every ``dwell`` updates
    or more, and only when the new one is at least ``1 + step`` times the
    current one (or reaches ``limit``): a noisy estimate does not make it
    creep by a few examples at a time, nor restart workers at every wobble.
    One change multiplies it by ``max_factor`` at most: nor does a noisy
    estimate (the first ones above all) make it leap, far past the noise
    scale that training will reach, and stay there. With the defaults
    (``step=1``, ``max_factor=2``) every change doubles the batch, so the
    worker count changes at most once per doubling. The estimator's
    ``max_batch_size`` applies on top, as for every damper (a request above
    it divides the learning rate instead).

    Parameters
    ----------
    initial : int, default=32
        Batch size until the first change (> 0).
    kappa : float, default=1.0
        The batch size aimed at, in units of ``B_simple`` (> 0).
    dwell : int, default=10
        Model updates between two changes, at least (>= 1).
    step : float, default=1.0
        Smallest relative growth of a change (>= 0): 1 grows at least 2x.
    max_factor : float or None, default=2.0
        Largest growth factor of one change (>= 1 + step; None: no bound).
    limit : float or None, default=None
        The largest batch size requested (None: no bound).

    Attributes
    ----------
    batch_size_ : float or None
        The batch size requested now (None before the first update).
    changed_at_ : int
        The update count at the last change (0 at the start).
    """

    needs_grad_stats = True
    adaptive = True

    def __init__(
        self,
        initial: int = 32,
        kappa: float = 1.0,
        dwell: int = 10,
        step: float = 1.0,
        max_factor: float | None = 2.0,
        limit: float | None = None,
    ):
        self.initial = initial
        self.kappa = kappa
        self.dwell = dwell
        self.step = step
        self.max_factor = max_factor
        self.limit = limit
        self.batch_size_: float | None = None
        self.changed_at_ = 0

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive("initial", self.initial, owner)
        self._check_factor()
        check_int_at_least("dwell", self.dwell, 1, owner)
        check_at_least("step", self.step, 0, owner)
        if self.max_factor is not None:
            check_at_least("max_factor", self.max_factor, 1 + self.step, owner)
        if self.limit is not None:
            check_at_least("limit", self.limit, self.initial, owner)

    def _check_factor(self) -> None:
        check_positive("kappa", self.kappa, type(self).__name__)

    def _factor(self) -> float:
        """What multiplies ``B_simple`` (``kappa``; the norm test derives it)."""
        return self.kappa

    def damping(self, state: TrainState) -> float:
        current = self.initial if self.batch_size_ is None else self.batch_size_
        self.batch_size_ = current
        b_simple = state.grad_stats.get("gns_b_simple")
        if b_simple is None or not is_real(b_simple):
            return current
        if state.model_updates - self.changed_at_ < self.dwell:
            return current
        target = max(current, self._factor() * b_simple)
        if self.limit is not None:
            target = min(target, max(current, self.limit))
        at_limit = self.limit is not None and target >= self.limit > current
        if target >= current * (1 + self.step) or at_limit:
            if self.max_factor is not None:
                target = min(target, current * self.max_factor)
            self.batch_size_ = float(target)
            self.changed_at_ = state.model_updates
        return self.batch_size_


class NormTestDamp(GNSDamp):
    """The norm test of Byrd et al. (2012) / Big Batch SGD, as a growth rule.

    The test asks that the mean gradient's variance be small against its
    norm, ``tr(Sigma) / B <= eta^2 |G|^2``; where it fails, the batch grows
    to the smallest size that passes, ``B = B_simple / eta^2``. So this is
    :class:`GNSDamp` with ``kappa = 1 / eta^2``, with its dwell, step,
    max_factor and limit (which see).

    Parameters
    ----------
    initial : int, default=32
        Batch size until the first change (> 0).
    eta : float, default=1.0
        The test's tolerance (> 0): smaller asks for larger batches.
    dwell, step, max_factor, limit
        As for :class:`GNSDamp`.
    """

    def __init__(
        self,
        initial: int = 32,
        eta: float = 1.0,
        dwell: int = 10,
        step: float = 1.0,
        max_factor: float | None = 2.0,
        limit: float | None = None,
    ):
        self.initial = initial
        self.eta = eta
        self.dwell = dwell
        self.step = step
        self.max_factor = max_factor
        self.limit = limit
        self.batch_size_: float | None = None
        self.changed_at_ = 0

    def _check_factor(self) -> None:
        check_positive("eta", self.eta, type(self).__name__)

    def _factor(self) -> float:
        return 1.0 / self.eta**2


# ---------------------------------------------------------------------------

DAMPERS: dict[str, type[BaseDamper]] = {
    cls.__name__: cls
    for cls in (
        Constant,
        GeoDamp,
        GeoDampLR,
        PadaDamp,
        CntsDampLR,
        GradientDescent,
        AdaDamp,
        RadaDamp,
        GNSDamp,
        NormTestDamp,
    )
}
"""Every damper shipped with adadamp, by class name."""
