"""The gradient noise scale from two batch sizes, and learning-rate scaling rules.

Every update's gradient is computed in *pieces*: each rank sums the
per-example gradients of its slice of the batch, in micro-batches of at most
``worker_max_batch_size`` examples. The pieces are the small batches of
McCandlish et al. (2018, "An Empirical Model of Large-Batch Training",
appendix A), the whole update the big one. A piece ``i`` of ``b_i`` examples
with gradient sum ``s_i`` has the mean ``g_i = s_i / b_i``, and for ``K``
pieces making up the ``B`` examples of an update with mean gradient ``g_B``

    E[sum_i b_i |g_i|^2] = B |G|^2 + K tr(Sigma),    E[B |g_B|^2] = B |G|^2 + tr(Sigma),

so ``tr(Sigma) ~ (sum_i b_i |g_i|^2 - B |g_B|^2) / (K - 1)`` and
``|G|^2 ~ |g_B|^2 - tr(Sigma) / B`` are unbiased whatever the piece sizes;
with ``K`` equal pieces of ``b = B / K`` they are McCandlish's
``(B |g_B|^2 - b |g_b|^2) / (B - b)`` and ``(|g_b|^2 - |g_B|^2) / (1/b - 1/B)``.
They depend on the pieces, not on which rank computed which: ``P`` workers
and one worker with ``P`` micro-batches of the same examples agree up to
floating-point order.

Each estimate is noisy (often negative for ``|G|^2``): the two are smoothed
separately by bias-corrected exponential moving averages, and only their
ratio, the simple noise scale ``B_simple = tr(Sigma) / |G|^2``, is formed
from the averages (a ratio of unbiased estimates is biased).

This module is pure arithmetic on floats, shared by the engines (which
reduce the sums), the dampers (which read the results from
``TrainState.grad_stats``) and the max-batch-size rule (which scales the
learning rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

#: Weight of the past in the moving averages of ``|G|^2`` and ``tr(Sigma)``.
EMA_BETA = 0.95

#: The learning-rate scaling rules of the estimators' ``lr_scaling`` option.
LR_SCALINGS = ("none", "linear", "sqrt", "adascale")

#: Statistics recorded per update in ``history_`` when the engine computed them.
HISTORY_KEYS = (
    "grad_sq_norm",
    "gns_grad_sq",
    "gns_trace",
    "gns_grad_sq_avg",
    "gns_trace_avg",
    "gns_b_simple",
)


# The moving averages' state, carried in ``grad_stats`` from update to update.
_AVERAGES = ("gns_m_grad_sq", "gns_m_trace", "gns_weight")


def raw_estimates(
    batch_sq_norm: float, piece_sq_sum: float, pieces: float, batch_size: int
) -> dict[str, float]:
    """The unbiased estimates of one update (see the module docstring).

    Parameters
    ----------
    batch_sq_norm : float
        ``|g_B|^2``, the squared norm of the update's mean gradient.
    piece_sq_sum : float
        ``sum_i |s_i|^2 / b_i`` over the update's pieces.
    pieces : float
        ``K``, the number of (non-empty) pieces.
    batch_size : int
        ``B``.

    Returns
    -------
    dict
        ``gns_grad_sq`` (``|G|^2``) and ``gns_trace`` (``tr(Sigma)``); empty
        with fewer than two pieces (nothing to compare) or a non-finite input.
    """
    k = round(pieces)
    if k < 2 or not (math.isfinite(batch_sq_norm) and math.isfinite(piece_sq_sum)):
        return {}
    trace = (piece_sq_sum - batch_size * batch_sq_norm) / (k - 1)
    return {"gns_grad_sq": batch_sq_norm - trace / batch_size, "gns_trace": trace}


def smoothed(
    previous: Mapping[str, float], raw: Mapping[str, float], span: int = 1
) -> dict[str, float]:
    """Fold one update's ``raw`` statistics into the averages of ``previous``.

    ``previous`` is the last update's ``grad_stats`` (empty at the start); the
    result carries ``raw``, the averages' state and the smoothed estimates
    ``gns_grad_sq_avg``, ``gns_trace_avg`` and ``gns_b_simple``. ``span``:
    how many updates the estimates stand for (a lone rank estimates on every
    few updates only, see :data:`adadamp.engines._step.SPLIT_EVERY`); the
    past then weighs ``EMA_BETA ** span``, so the averages cover as many
    updates however often they are fed. An update without estimates (or
    with a non-finite one) leaves the averages as they were. ``B_simple`` is
    formed only while the averaged ``|G|^2`` is positive (otherwise the
    previous one is kept); a negative averaged trace gives 0.
    """
    out = dict(raw)
    state = {
        k: previous[k] for k in ("gns_m_grad_sq", "gns_m_trace", "gns_weight") if k in previous
    }
    g, s = raw.get("gns_grad_sq"), raw.get("gns_trace")
    if g is not None and s is not None and math.isfinite(g) and math.isfinite(s):
        m_g, m_s = state.get("gns_m_grad_sq", 0.0), state.get("gns_m_trace", 0.0)
        weight = state.get("gns_weight", 0.0)
        beta = EMA_BETA**span
        state = {
            "gns_m_grad_sq": beta * m_g + (1 - beta) * g,
            "gns_m_trace": beta * m_s + (1 - beta) * s,
            # 1 - beta^t: dividing by it removes the averages' pull towards 0.
            "gns_weight": beta * weight + (1 - beta),
        }
    out.update(state)
    if state.get("gns_weight", 0.0) > 0:
        g_avg = state["gns_m_grad_sq"] / state["gns_weight"]
        s_avg = state["gns_m_trace"] / state["gns_weight"]
        out["gns_grad_sq_avg"], out["gns_trace_avg"] = g_avg, s_avg
        if g_avg > 0:
            out["gns_b_simple"] = max(s_avg, 0.0) / g_avg
    if "gns_b_simple" not in out and "gns_b_simple" in previous:
        out["gns_b_simple"] = previous["gns_b_simple"]
    return out


def adascale_gain(stats: Mapping[str, float], scale: float, base_batch_size: float) -> float:
    """AdaScale's gain ``r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2)`` (Johnson et al., 2020).

    ``mu^2 = |G|^2`` and ``sigma^2 = tr(Sigma) / B0``, the variance of a mean
    gradient over the base batch ``B0``, from the smoothed estimates; ``S``
    is ``scale``. So ``r = 1`` at ``S = 1`` and ``r`` lies in ``[1, S]`` for
    ``S >= 1`` (``[S, 1]`` below). Without estimates yet, ``r = 1``.
    """
    b_simple = stats.get("gns_b_simple")
    if b_simple is None or not math.isfinite(b_simple):
        return 1.0
    ratio = b_simple / base_batch_size  # sigma^2 / mu^2
    return (ratio + 1) / (ratio / scale + 1)


def lr_gain(
    rule: str, batch_size: int, base_batch_size: float, stats: Mapping[str, float]
) -> float:
    """The factor ``rule`` multiplies the learning rate by at ``batch_size``.

    ``S = batch_size / base_batch_size``: ``"none"`` gives 1, ``"linear"``
    ``S``, ``"sqrt"`` ``sqrt(S)``, ``"adascale"`` :func:`adascale_gain`.
    """
    scale = batch_size / base_batch_size
    if rule == "none":
        return 1.0
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "adascale":
        return adascale_gain(stats, scale, base_batch_size)
    raise ValueError(
        f"lr_scaling must be one of {', '.join(map(repr, LR_SCALINGS))}, got {rule!r}."
    )
