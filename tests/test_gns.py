"""The gradient noise scale, GNSDamp, the norm test and the learning-rate scaling rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, updates  # noqa: F401
from torch import nn

from adadamp import gns
from adadamp.dampers import DAMPERS, Constant, GeoDamp, GNSDamp, NormTestDamp
from adadamp.engines._step import SPLIT_EVERY
from adadamp.estimators import DaskClassifier, DaskRegressor
from adadamp.schedule import next_update
from adadamp.state import TrainState

# --------------------------------------------------------------------------- the estimates


def _least_squares(n: int, d: int, sigma: float, seed: int):
    """``y = x . w* + eps`` with ``x ~ N(0, I)``, ``w* = 0``: G and Sigma in closed form."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype("float32")
    y = (sigma * rng.standard_normal((n, 1))).astype("float32")
    return X, y


def _closed_form(delta: np.ndarray, sigma: float) -> tuple[float, float]:
    """``|G|^2`` and ``tr(Sigma)`` of the squared error ``(x . w - y)^2`` at ``w = w* + delta``.

    The per-example gradient is ``2 (x x^T delta - eps x)``, so ``G = 2 delta`` and
    ``Sigma = 4 (delta delta^T + |delta|^2 I + sigma^2 I)`` (Gaussian fourth moments).
    """
    d, sq = len(delta), float(delta @ delta)
    return 4 * sq, 4 * ((d + 1) * sq + d * sigma**2)


def _frozen_fit(X, y, *, batch, micro, backend="local", client=None, workers=1, epochs=1):
    """A fit with learning rate 0 (the weights, and so G and Sigma, stay put)."""
    torch.manual_seed(0)
    module = nn.Linear(X.shape[1], 1, bias=False)
    est = DaskRegressor(
        module,
        batch_size=GNSDamp(initial=batch, dwell=10**9),  # the statistics, a constant batch
        optimizer=torch.optim.SGD,
        lr=0.0,
        max_epochs=epochs,
        worker_max_batch_size=micro,
        backend=backend,
        client=client,
        min_workers=workers,
        max_workers=workers,
        random_state=0,
        verbose=0,
    )
    delta = module.weight.detach().double().numpy().ravel().copy()
    return est.fit(X, y), delta


def test_estimates_are_unbiased_on_least_squares():
    # 500 updates of B = 256 in pieces of 64 (K = 4), all through the engine's loop.
    d, sigma, batch = 8, 1.0, 256
    X, y = _least_squares(500 * batch, d, sigma, seed=1)
    est, delta = _frozen_fit(X, y, batch=batch, micro=64)
    g_true, s_true = _closed_form(delta, sigma)
    g = np.array(updates(est, "gns_grad_sq"))
    s = np.array(updates(est, "gns_trace"))
    assert len(g) == len(s) == 500
    assert abs(g.mean() / g_true - 1) < 0.05
    assert abs(s.mean() / s_true - 1) < 0.05
    assert abs((s.mean() / g.mean()) / (s_true / g_true) - 1) < 0.10
    # Single draws are far noisier than the mean: what the smoothing is for.
    assert g.std() > 0.1 * g_true
    # The smoothed noise scale the dampers read, after many updates.
    assert abs(updates(est, "gns_b_simple")[-1] / (s_true / g_true) - 1) < 0.25


def test_raw_estimates_with_pieces_of_unequal_sizes():
    # Gaussian per-example "gradients" with known mean and covariance, pieces 5, 11, 16.
    rng = np.random.default_rng(0)
    mean, scale = np.array([1.0, -2.0, 0.5]), np.array([3.0, 1.0, 2.0])
    sizes = [5, 11, 16]
    draws = []
    for _ in range(4000):
        sums = [(mean + scale * rng.standard_normal((b, 3))).sum(axis=0) for b in sizes]
        total = np.sum(sums, axis=0)
        batch = sum(sizes)
        piece_sq = sum(float(s @ s) / b for s, b in zip(sums, sizes))
        draws.append(gns.raw_estimates(float(total @ total) / batch**2, piece_sq, 3, batch))
    g = np.mean([r["gns_grad_sq"] for r in draws])
    s = np.mean([r["gns_trace"] for r in draws])
    assert g == pytest.approx(float(mean @ mean), rel=0.05)
    assert s == pytest.approx(float(scale @ scale), rel=0.05)


def test_raw_estimates_need_two_finite_pieces():
    assert gns.raw_estimates(1.0, 2.0, 1, 10) == {}
    assert gns.raw_estimates(float("nan"), 2.0, 2, 10) == {}
    assert set(gns.raw_estimates(1.0, 20.0, 2, 10)) == {"gns_grad_sq", "gns_trace"}


def test_smoothing_is_bias_corrected_and_guarded():
    first = gns.smoothed({}, {"gns_grad_sq": 2.0, "gns_trace": 10.0})
    # Bias-corrected: the first average is the first value, not (1 - beta) of it.
    assert first["gns_grad_sq_avg"] == pytest.approx(2.0)
    assert first["gns_b_simple"] == pytest.approx(5.0)
    # A negative |G|^2 estimate enters the average (clipping it would bias it) ...
    second = gns.smoothed(first, {"gns_grad_sq": -1.0, "gns_trace": 10.0})
    beta = gns.EMA_BETA
    expected_g = (beta * (1 - beta) * 2.0 + (1 - beta) * -1.0) / (1 - beta**2)
    assert second["gns_grad_sq_avg"] == pytest.approx(expected_g)
    # ... and while the average is not positive, the last noise scale is held.
    state: dict[str, float] = first
    for _ in range(200):
        state = gns.smoothed(state, {"gns_grad_sq": -5.0, "gns_trace": 10.0})
    assert state["gns_grad_sq_avg"] < 0
    assert state["gns_b_simple"] == pytest.approx(5.0)
    # Non-finite values leave the averages alone; a negative trace gives 0.
    same = gns.smoothed(first, {"gns_grad_sq": float("inf"), "gns_trace": 1.0})
    assert same["gns_grad_sq_avg"] == first["gns_grad_sq_avg"]
    assert gns.smoothed({}, {"gns_grad_sq": 1.0, "gns_trace": -3.0})["gns_b_simple"] == 0.0


# --------------------------------------------------------------------------- P-invariance

P_N, P_BATCH = 240, 60


def _digits_fit(backend, *, micro=None, client=None, workers=1, epochs=2):
    X, y = digits(P_N)
    torch.manual_seed(0)
    est = DaskClassifier(
        MLP(features=64, hidden=16, out=10),
        batch_size=GNSDamp(initial=P_BATCH, dwell=10**9),
        optimizer=torch.optim.SGD,
        lr=0.1,
        max_epochs=epochs,
        train_split=None,
        worker_max_batch_size=micro,
        grads_per_worker=P_BATCH,
        min_workers=workers,
        max_workers=workers,
        backend=backend,
        client=client,
        random_state=3,
        verbose=0,
    )
    return est.fit(X, y)


STAT_KEYS = ("gns_grad_sq", "gns_trace", "gns_b_simple")


def _assert_same_stats(est, reference):
    for key in STAT_KEYS:
        mine, theirs = _raw_per_update(est, key), _raw_per_update(reference, key)
        assert [m is None for m in mine] == [t is None for t in theirs]
        mine, theirs = [m for m in mine if m is not None], [t for t in theirs if t is not None]
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-7)


def _raw_per_update(est, key: str) -> list:
    return [batch.get(key) for epoch in est.history_ for batch in epoch["batches"]]


def test_one_rank_splits_its_batch_in_two_on_every_tenth_update():
    # Without micro-batches a lone rank computes two halves, as micro-batches
    # of 30 would, on updates 1, 11, 21, ... only: a split costs a backward pass.
    alone = _digits_fit("local", epochs=6)
    halves = _digits_fit("local", micro=P_BATCH // 2, epochs=6)
    n = len(updates(alone, "train_loss"))
    due = [u % SPLIT_EVERY == 1 for u in range(1, n + 1)]
    assert SPLIT_EVERY > 1 and sum(due) == 3
    for key in ("gns_grad_sq", "gns_trace"):
        mine, theirs = _raw_per_update(alone, key), _raw_per_update(halves, key)
        assert [m is not None for m in mine] == due
        measured = [(m, t) for m, t, d in zip(mine, theirs, due) if d]
        assert [m for m, _ in measured] == pytest.approx([t for _, t in measured], rel=1e-4)
    # Between splits nothing reads the squared norm of the mean gradient, so
    # it is left uncomputed; every update carries the noise scale.
    assert [g is not None for g in _raw_per_update(alone, "grad_sq_norm")] == due
    assert None not in _raw_per_update(alone, "gns_b_simple")


def test_an_estimate_that_stands_for_several_updates_weighs_as_much():
    raw = {"gns_grad_sq": 2.0, "gns_trace": 10.0}
    start = gns.smoothed({}, {"gns_grad_sq": 1.0, "gns_trace": 30.0})
    once = gns.smoothed(start, raw, span=10)
    repeated = start
    for _ in range(10):
        repeated = gns.smoothed(repeated, raw)
    for key in ("gns_m_grad_sq", "gns_m_trace", "gns_weight", "gns_b_simple"):
        assert once[key] == pytest.approx(repeated[key], rel=1e-12)


# Worker counts ascend so that the shared cluster only grows.
@pytest.mark.parametrize(
    "workers, backend",
    [
        (1, "decentralized"),
        (2, "decentralized"),
        (2, "centralized"),
        # A third worker process takes long to start on two busy cores.
        pytest.param(3, "decentralized", marks=pytest.mark.slow),
    ],
)
def test_workers_estimate_as_micro_batches_do(dask_client, workers, backend):
    # The workers are there before the fit: a fit does not wait for one to start.
    dask_client.cluster.scale(workers)
    dask_client.wait_for_workers(workers)
    # One worker is a lone rank, as the local engine without micro-batches is.
    reference = _digits_fit("local", micro=P_BATCH // workers if workers > 1 else None)
    est = _digits_fit(backend, client=dask_client, workers=workers)
    assert updates(est, "workers") == [workers] * len(updates(reference, "workers"))
    _assert_same_stats(est, reference)


# --------------------------------------------------------------------------- GNSDamp


def _state(updates_done: int, b_simple: float | None) -> TrainState:
    state = TrainState(n_examples=10**6, model_updates=updates_done)
    if b_simple is not None:
        state.grad_stats = {"gns_b_simple": b_simple}
    return state


def _requests(damper, b_simples) -> list[float]:
    return [damper.damping(_state(k, b)) for k, b in enumerate(b_simples)]


def test_gnsdamp_follows_kappa_times_the_noise_scale():
    d = GNSDamp(initial=10, kappa=2.0, dwell=1, step=0.0, max_factor=None)
    assert d.needs_grad_stats and d.adaptive and not d.needs_loss
    assert _requests(d, [None, 30.0, 40.0]) == [10, 60.0, 80.0]
    assert DAMPERS["GNSDamp"] is GNSDamp and DAMPERS["NormTestDamp"] is NormTestDamp


def test_gnsdamp_never_shrinks():
    d = GNSDamp(initial=10, kappa=1.0, dwell=1, step=0.0, max_factor=None)
    got = _requests(d, [None, 50.0, 20.0, 5.0, 80.0, 1.0])
    assert got == [10, 50.0, 50.0, 50.0, 80.0, 80.0]
    assert all(b >= a for a, b in zip(got, got[1:]))


def test_gnsdamp_respects_dwell():
    d = GNSDamp(initial=10, kappa=1.0, dwell=5, step=0.0, max_factor=None)
    got = _requests(d, [10.0 * (k + 2) for k in range(16)])
    changes = [k for k in range(1, len(got)) if got[k] != got[k - 1]]
    assert changes == [5, 10, 15]
    assert got[5] == 70.0


def test_gnsdamp_changes_only_by_its_step():
    d = GNSDamp(initial=100, kappa=1.0, dwell=1, step=0.5)
    # 149 is under 1.5 x 100: held; 150 is not.
    got = _requests(d, [None, 120.0, 149.0, 150.0, 200.0, 230.0])
    assert got == [100, 100, 100, 150.0, 150.0, 230.0]


def test_gnsdamp_limit_and_the_max_batch_size_rule():
    d = GNSDamp(initial=100, kappa=1.0, dwell=1, step=1.0, limit=150)
    # 150 is less than a doubling, but it is the limit: reached.
    assert _requests(d, [None, 1000.0, 5000.0]) == [100, 150.0, 150.0]
    # The estimator's max_batch_size applies as for every damper.
    d = GNSDamp(initial=100, kappa=1.0, dwell=1, step=0.0, max_factor=None)
    plan = next_update(d, _state(3, 400.0), max_batch_size=200, start=0)
    assert (plan.damping, plan.batch_size, plan.lr_factor) == (400.0, 200, 0.5)


def test_norm_test_is_the_noise_scale_over_eta_squared():
    d = NormTestDamp(initial=10, eta=0.5, dwell=1, step=0.0, max_factor=None)
    assert _requests(d, [None, 30.0]) == [10, 120.0]  # B = B_simple / eta^2
    assert "kappa" not in d.get_params()


def test_gnsdamp_grows_at_most_max_factor_per_change():
    d = GNSDamp(initial=10, kappa=1.0, dwell=1, step=1.0)  # max_factor=2
    # A first estimate far above the batch moves it one doubling at a time.
    assert _requests(d, [None, 1000.0, 1000.0, 1000.0, 30.0]) == [10, 20.0, 40.0, 80.0, 80.0]
    d = GNSDamp(initial=10, kappa=1.0, dwell=1, step=0.5, max_factor=3.0)
    assert _requests(d, [None, 14.0, 16.0, 1000.0]) == [10, 10, 16.0, 48.0]


def test_gnsdamp_state_dict_round_trip():
    d = GNSDamp(initial=10, dwell=2, step=0.0, max_factor=None)
    _requests(d, [None, 30.0, 40.0, 60.0])
    saved = d.state_dict()
    fresh = GNSDamp(initial=10, dwell=2, step=0.0, max_factor=None)
    fresh.load_state_dict(saved)
    assert (fresh.batch_size_, fresh.changed_at_) == (d.batch_size_, d.changed_at_) == (40.0, 2)


@pytest.mark.parametrize(
    "cls, params, name",
    [
        (GNSDamp, {"kappa": 0}, "kappa"),
        (GNSDamp, {"dwell": 0}, "dwell"),
        (GNSDamp, {"step": -1}, "step"),
        (GNSDamp, {"step": 1, "max_factor": 1.5}, "max_factor"),
        (GNSDamp, {"initial": 64, "limit": 10}, "limit"),
        (NormTestDamp, {"eta": 0}, "eta"),
    ],
)
def test_bad_parameters_name_themselves(cls, params, name):
    with pytest.raises(ValueError, match=name):
        cls(**params).validate()


# --------------------------------------------------------------------------- learning rates


def test_adascale_gain_is_one_at_scale_one_and_within_one_and_s():
    rng = np.random.default_rng(0)
    for _ in range(200):
        stats = {"gns_b_simple": float(rng.lognormal(3, 2))}
        base = float(rng.integers(1, 256))
        assert gns.adascale_gain(stats, 1.0, base) == pytest.approx(1.0)
        scale = float(rng.uniform(1, 100))
        r = gns.adascale_gain(stats, scale, base)
        assert 1.0 <= r <= scale * (1 + 1e-12)
    # Pure noise: the full linear gain; no noise: none.
    assert gns.adascale_gain({"gns_b_simple": 1e12}, 8.0, 32) == pytest.approx(8.0)
    assert gns.adascale_gain({"gns_b_simple": 0.0}, 8.0, 32) == 1.0
    assert gns.adascale_gain({}, 8.0, 32) == 1.0  # no estimate yet


def test_linear_and_sqrt_rules_follow_the_batch_size():
    assert gns.lr_gain("linear", 128, 32, {}) == 4.0
    assert gns.lr_gain("sqrt", 128, 32, {}) == 2.0
    assert gns.lr_gain("none", 128, 32, {}) == 1.0
    with pytest.raises(ValueError, match="lr_scaling"):
        gns.lr_gain("cubic", 128, 32, {})


@pytest.mark.parametrize("rule, power", [("linear", 1.0), ("sqrt", 0.5)])
def test_estimator_scales_the_learning_rate(rule, power):
    X, y = digits(256)
    est = DaskClassifier(
        MLP,
        batch_size=GeoDamp(initial=16, delay=1, factor=2),
        lr=0.01,
        max_epochs=3,
        train_split=None,
        backend="local",
        random_state=0,
        lr_scaling=rule,
        verbose=0,
    ).fit(X, y)
    sizes, lrs = updates(est, "train_batch_size"), updates(est, "lr")
    assert set(sizes) >= {16, 32, 64}
    # Relative to the damper's initial batch size, short last batches included.
    assert lrs == pytest.approx([0.01 * (b / 16) ** power for b in sizes], rel=1e-12)
    assert est.history_[-1]["epochs"] == 3


def test_adascale_clock_runs_on_until_the_budget_is_met():
    X, y = digits(256)
    est = DaskClassifier(
        MLP,
        batch_size=GNSDamp(initial=8, kappa=4.0, dwell=2),
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.01,
        max_epochs=2,
        train_split=None,
        backend="local",
        random_state=0,
        lr_scaling="adascale",
        verbose=0,
    ).fit(X, y)
    sizes, lrs = updates(est, "train_batch_size"), updates(est, "lr")
    gains = [lr / 0.01 for lr in lrs]
    assert max(sizes) > 8
    assert all(1 - 1e-9 <= g <= b / 8 + 1e-9 for g, b in zip(gains, sizes) if b >= 8)
    assert any(g < b / 8 - 1e-6 for g, b in zip(gains, sizes))  # sub-linear somewhere
    # Each update counts its gain in base batches: more epochs of data than max_epochs.
    last = est.history_[-1]
    assert last["progress"] >= 2 - 1e-9
    assert 2 < len(est.history_) <= 20
    assert last["epochs"] == len(est.history_)


def test_constant_batch_at_adascale_is_plain_training():
    X, y = digits(128)
    est = DaskClassifier(
        MLP,
        batch_size=Constant(32),
        lr=0.05,
        max_epochs=2,
        train_split=None,
        backend="local",
        random_state=0,
        lr_scaling="adascale",
        verbose=0,
    ).fit(X, y)
    assert updates(est, "lr") == pytest.approx([0.05] * 8)
    assert len(est.history_) == 2 and est.history_[-1]["progress"] == pytest.approx(2.0)


def test_bad_lr_scaling_is_refused_before_training():
    X, y = digits(64)
    est = DaskClassifier(MLP, lr_scaling="quadratic", backend="local", verbose=0)
    with pytest.raises(ValueError, match=r"lr_scaling must be one of 'none', 'linear'"):
        est.fit(X, y)
    assert not hasattr(est, "history_") or len(est.history_) == 0


def test_statistics_only_when_something_reads_them():
    X, y = digits(128)
    est = DaskClassifier(
        MLP, batch_size=32, max_epochs=1, train_split=None, backend="local", verbose=0
    ).fit(X, y)
    assert "gns_b_simple" not in est.history_[-1]["batches"][-1]


# --------------------------------------------------------------------------- rescales


def test_gnsdamp_rescales_at_most_once_per_doubling(dask_client):
    X, y = digits(600)
    torch.manual_seed(0)
    est = DaskClassifier(
        MLP(features=64, hidden=16, out=10),
        batch_size=GNSDamp(initial=16, kappa=4.0, dwell=3),
        optimizer=torch.optim.SGD,
        lr=0.05,
        max_epochs=3,
        train_split=None,
        grads_per_worker=16,
        max_workers=3,
        backend="decentralized",
        client=dask_client,
        random_state=0,
        verbose=0,
    ).fit(X, y)
    rescales = [r for row in est.history_ for r in row["rescales"]]
    requested = updates(est, "damping")
    assert max(requested) >= 4 * 16, "the batch should have grown in this run"
    assert rescales, "and the workers with it"
    # The batch requested at each rescale at least doubled since the previous one.
    at_rescale = [16.0] + [requested[r["update"]] for r in rescales]
    assert all(b >= 2 * a for a, b in zip(at_rescale, at_rescale[1:])), at_rescale
    assert len(rescales) <= math.log2(max(requested) / 16)
    workers = updates(est, "workers")
    assert sum(a != b for a, b in zip(workers, workers[1:])) == len(rescales)
