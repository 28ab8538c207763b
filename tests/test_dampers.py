"""Batch-size policies: exact schedules, the max-batch rule, adaptive state, resolution."""

from __future__ import annotations

import math

import pytest

from adadamp._batch_size_param import resolve_damper
from adadamp.dampers import (
    DAMPERS,
    AdaDamp,
    BaseDamper,
    CntsDampLR,
    Constant,
    GeoDamp,
    GeoDampLR,
    GradientDescent,
    PadaDamp,
    RadaDamp,
)
from adadamp.schedule import plan_epochs, plan_update
from adadamp.state import TrainState


def batch_sizes(plans):
    return [[p.batch_size for p in epoch] for epoch in plans]


def flat(plans, attr):
    return [getattr(p, attr) for epoch in plans for p in epoch]


def expected_epoch(n: int, b: int) -> list[int]:
    """An epoch of n examples walked b at a time, the last batch taking the rest."""
    updates = math.ceil(n / b)
    return [b] * (updates - 1) + [n - (updates - 1) * b]


# --------------------------------------------------------------------------- schedules


def test_geodamp_doubles_every_two_epochs():
    n = 100
    plans = plan_epochs(GeoDamp(initial=8, delay=2, factor=2), n, 8)
    per_epoch = [8, 8, 16, 16, 32, 32, 64, 64]
    assert [epoch[0].batch_size for epoch in plans] == per_epoch
    assert batch_sizes(plans) == [expected_epoch(n, b) for b in per_epoch]
    for epoch, b in zip(plans, per_epoch):
        assert len(epoch) == math.ceil(n / b)
        assert epoch[-1].batch_size == n - (math.ceil(n / b) - 1) * b
        assert sum(p.batch_size for p in epoch) == n
        # start offsets walk the permutation without gaps
        assert [p.start for p in epoch] == [i * b for i in range(len(epoch))]
    assert set(flat(plans, "lr_factor")) == {1.0}


def test_geodamp_non_integer_delay():
    # delay 1.5 epochs: the increase applies from the first update starting at
    # e >= 1.5, even mid-epoch, where the epoch's end clips it.
    plans = plan_epochs(GeoDamp(initial=10, delay=1.5, factor=3), 20, 3)
    assert flat(plans, "damping") == [10, 10, 10, 30, 30]
    assert batch_sizes(plans) == [[10, 10], [10, 10], [20]]


def test_geodamp_lr_keeps_batch_and_divides_lr():
    n, f = 64, 4
    plans = plan_epochs(GeoDampLR(initial=16, delay=1, factor=f), n, 4)
    assert batch_sizes(plans) == [[16] * 4] * 4
    lr = [[p.lr_factor for p in epoch] for epoch in plans]
    assert lr == [[pytest.approx(f**-e)] * 4 for e in range(4)]
    assert flat(plans, "damping") == [16 * f**e for e in range(4) for _ in range(4)]


def test_padadamp_matches_formula():
    n, initial, rate = 200, 5, 1.5
    plans = plan_epochs(PadaDamp(initial=initial, rate=rate), n, 3)
    used = flat(plans, "batch_size")
    # Independent walk: B_k = ceil(initial + rate * k), clipped at each epoch's end.
    want, k = [], 0
    for _ in range(3):
        left = n
        while left:
            b = min(math.ceil(initial + rate * k), left)
            want.append(b)
            left -= b
            k += 1
    assert used == want
    assert used[:4] == [5, 7, 8, 10]
    assert set(flat(plans, "lr_factor")) == {1.0}


def test_padadamp_rate_zero_is_constant():
    plans = plan_epochs(PadaDamp(initial=7, rate=0), 20, 2)
    assert batch_sizes(plans) == [[7, 7, 6], [7, 7, 6]]


def test_cntsdamp_lr_decays_like_one_over_k():
    initial, rate = 10, 0.5
    plans = plan_epochs(CntsDampLR(initial=initial, rate=rate), 50, 2)
    assert set(flat(plans, "batch_size")) == {initial}
    lr = flat(plans, "lr_factor")
    assert len(lr) == 10
    assert lr == [pytest.approx(1 / (1 + rate * k)) for k in range(10)]
    assert lr[0] == 1.0


def test_cntsdamp_lr_rate_zero_keeps_lr():
    plans = plan_epochs(CntsDampLR(initial=8, rate=0.0), 32, 2)
    assert set(flat(plans, "lr_factor")) == {1.0}


def test_gradient_descent_one_full_update_per_epoch():
    plans = plan_epochs(GradientDescent(), 37, 4)
    assert batch_sizes(plans) == [[37]] * 4
    assert flat(plans, "lr_factor") == [1.0] * 4


def test_constant():
    plans = plan_epochs(Constant(12), 30, 2)
    assert batch_sizes(plans) == [[12, 12, 6], [12, 12, 6]]


def test_plan_epochs_refuses_adaptive_dampers():
    for damper in (AdaDamp(), RadaDamp()):
        with pytest.raises(ValueError, match="cannot be planned"):
            plan_epochs(damper, 10, 1)


# --------------------------------------------------------------------------- max-batch rule


def test_geodamp_with_cap_becomes_hybrid():
    plans = plan_epochs(GeoDamp(initial=8, delay=1, factor=5), 80, 3, max_batch_size=40)
    assert batch_sizes(plans) == [[8] * 10, [40, 40], [40, 40]]
    assert [epoch[0].lr_factor for epoch in plans] == [1.0, 1.0, pytest.approx(1 / 5)]
    assert [epoch[0].damping for epoch in plans] == [8, 40, 200]


def test_plan_update_rounding_and_caps():
    assert plan_update(7.2, None) == (8, 1.0)
    assert plan_update(8.0, 8) == (8, 1.0)
    assert plan_update(0.3, None) == (1, 1.0)
    assert plan_update(100, 25) == (25, 0.25)
    # the smaller of the user's and the damper's cap wins
    assert plan_update(100, 50, damper_cap=20) == (20, 0.2)
    assert plan_update(100, 10, damper_cap=20) == (10, 0.1)


def test_lr_dampers_declare_their_cap():
    assert GeoDampLR(initial=16).max_batch_size == 16
    assert CntsDampLR(initial=16).max_batch_size == 16
    assert GeoDamp(initial=16).max_batch_size is None
    assert PadaDamp().max_batch_size is None


# --------------------------------------------------------------------------- AdaDamp


def test_adadamp_formula():
    d = AdaDamp(initial=10, best_loss=0.5)
    assert d.needs_loss and d.adaptive and not d.needs_grad_stats
    s = TrainState(n_examples=100, train_loss=2.5)
    assert d.damping(s) == pytest.approx(10)
    assert d.initial_loss_ == 2.5
    for k, loss in [(1, 1.5), (2, 0.9), (3, 0.7)]:
        s.model_updates, s.train_loss = k, loss
        want = 10 * (2.5 - 0.5) / (loss - 0.5)
        assert d.damping(s) == pytest.approx(want)
        assert plan_update(d.damping(s), None)[0] == math.ceil(want - 1e-9)
    assert plan_update(d.damping(s), None)[0] == 100  # 10 * 2 / 0.2


def test_adadamp_dwell_holds_batch_between_evaluations():
    d = AdaDamp(initial=4, dwell=3)
    s = TrainState(n_examples=100)
    due = []
    for k in range(7):
        s.model_updates = k
        due.append(d.loss_due(s))
    assert due == [True, False, False, True, False, False, True]

    s.model_updates, s.train_loss = 0, 8.0
    assert d.damping(s) == 4
    # Between evaluations the batch is held even if train_loss changed
    # (e.g. refreshed for reporting): only due updates read it.
    s.train_loss = 1.0
    for k in (1, 2):
        s.model_updates = k
        assert d.damping(s) == 4
    s.model_updates = 3
    assert d.damping(s) == pytest.approx(32)
    s.model_updates, s.train_loss = 4, 0.5
    assert d.damping(s) == pytest.approx(32)


def test_adadamp_state_dict_round_trip():
    d = AdaDamp(initial=6, dwell=2, best_loss=0.1, loss_fraction=0.5)
    s = TrainState(n_examples=50, train_loss=3.1)
    d.damping(s)
    s.model_updates, s.train_loss = 2, 1.1
    d.damping(s)
    saved = d.state_dict()
    assert saved["initial_loss_"] == 3.1

    fresh = AdaDamp()
    fresh.load_state_dict(saved)
    assert fresh.get_params() == d.get_params()
    # held batch at an update between evaluations
    s.model_updates = 3
    assert fresh.damping(s) == d.damping(s) == pytest.approx(6 * 3.0 / 1.0)
    # and the F0 it learned at the next evaluation
    s.model_updates, s.train_loss = 4, 0.6
    assert fresh.damping(s) == d.damping(s) == pytest.approx(6 * 3.0 / 0.5)
    # the saved dict is a snapshot, not a view
    assert saved["batch_size_"] == pytest.approx(18)


def test_adadamp_loss_at_best_holds_last_batch():
    d = AdaDamp(initial=2)
    s = TrainState(n_examples=10, train_loss=1.0)
    d.damping(s)
    s.model_updates, s.train_loss = 1, 0.25
    assert d.damping(s) == pytest.approx(8)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        s.train_loss = bad
        assert d.damping(s) == pytest.approx(8)


def test_adadamp_initial_loss_below_best_raises():
    d = AdaDamp(best_loss=1.0)
    with pytest.raises(ValueError, match="best_loss"):
        d.damping(TrainState(n_examples=10, train_loss=0.5))


def test_adadamp_missing_loss_is_an_engine_error():
    with pytest.raises(RuntimeError, match="train_loss"):
        AdaDamp().damping(TrainState(n_examples=10))


# --------------------------------------------------------------------------- RadaDamp


def feed_loss(d: RadaDamp, losses: list[float]) -> list[float]:
    s = TrainState(n_examples=1000)
    out = [d.damping(s)]
    for k, loss in enumerate(losses, start=1):
        s.model_updates, s.last_loss = k, loss
        out.append(d.damping(s))
    return out


def test_radadamp_loss_signal():
    rho, fstar = 0.5, 1.0
    losses = [5.0, 3.0, 2.0, 1.5]
    d = RadaDamp(initial=8, rho=rho, best_loss=fstar)
    assert d.needs_grad_stats and d.adaptive and not d.needs_loss
    got = feed_loss(d, losses)
    # by hand: m = 5, 4, 3, 2.25; m0 = 5 - 1 = 4
    m, want = None, [8]
    for x in losses:
        m = x if m is None else rho * m + (1 - rho) * x
        want.append(8 * (5.0 - fstar) / (m - fstar))
    assert got == [pytest.approx(w) for w in want]
    assert got[1:] == [pytest.approx(v) for v in (8, 8 * 4 / 3, 8 * 4 / 2, 8 * 4 / 1.25)]
    assert d.average_ == pytest.approx(2.25)


def test_radadamp_grad_norm_signal_ignores_best_loss():
    d = RadaDamp(initial=4, rho=0.75, best_loss=100.0, signal="grad_norm")
    s = TrainState(n_examples=1000)
    assert d.damping(s) == 4
    norms = [16.0, 8.0, 0.0]
    avg = [16.0, 14.0, 10.5]
    for k, g in enumerate(norms, start=1):
        s.model_updates, s.last_loss, s.grad_stats = k, 9.0, {"grad_sq_norm": g}
        assert d.damping(s) == pytest.approx(4 * 16.0 / avg[k - 1])


def test_radadamp_rho_zero_follows_last_signal():
    got = feed_loss(RadaDamp(initial=3, rho=0.0), [6.0, 2.0, 3.0])
    assert got == [3, pytest.approx(3), pytest.approx(9), pytest.approx(6)]


def test_radadamp_counts_each_update_once():
    d = RadaDamp(initial=8, rho=0.5)
    s = TrainState(n_examples=100, model_updates=1, last_loss=4.0)
    d.damping(s)
    s.model_updates, s.last_loss = 2, 2.0
    first = d.damping(s)
    assert d.damping(s) == first == pytest.approx(8 * 4 / 3)


def test_radadamp_holds_batch_on_bad_signal():
    d = RadaDamp(initial=8, rho=0.0, best_loss=1.0)
    feed = feed_loss(d, [3.0, 2.0, 1.0, float("nan"), 0.5])
    assert feed == [8, 8] + [pytest.approx(16)] * 4


def test_radadamp_missing_grad_stat_is_an_engine_error():
    d = RadaDamp(signal="grad_norm")
    with pytest.raises(RuntimeError, match="grad_sq_norm"):
        d.damping(TrainState(n_examples=10, model_updates=1, last_loss=1.0))


def test_radadamp_first_loss_below_best_raises():
    d = RadaDamp(best_loss=2.0)
    with pytest.raises(ValueError, match="best_loss"):
        d.damping(TrainState(n_examples=10, model_updates=1, last_loss=1.0))


@pytest.mark.parametrize("signal", ["loss", "grad_norm"])
def test_radadamp_state_dict_round_trip(signal):
    d = RadaDamp(initial=5, rho=0.8, best_loss=0.5, signal=signal)
    s = TrainState(n_examples=100)
    values = [4.0, 3.0, 2.5]
    for k, v in enumerate(values, start=1):
        s.model_updates, s.last_loss, s.grad_stats = k, v, {"grad_sq_norm": v}
        d.damping(s)
    fresh = RadaDamp()
    fresh.load_state_dict(d.state_dict())
    assert fresh.get_params() == d.get_params()
    s.model_updates, s.last_loss, s.grad_stats = 4, 1.0, {"grad_sq_norm": 1.0}
    nxt = fresh.damping(s)
    assert nxt == pytest.approx(d.damping(s))
    assert nxt > 5


# --------------------------------------------------------------------------- resolve_damper


def test_resolve_int():
    d = resolve_damper(64, {})
    assert type(d) is Constant and d.initial == 64
    assert resolve_damper(3).damping(TrainState(n_examples=10)) == 3


def test_resolve_class_with_params():
    d = resolve_damper(GeoDamp, {"delay": 3, "factor": 2})
    assert type(d) is GeoDamp
    assert d.get_params() == {"initial": 128, "delay": 3, "factor": 2}
    assert type(resolve_damper(GradientDescent, {})) is GradientDescent


def test_resolve_instance_copies_and_never_mutates():
    user = AdaDamp(initial=16, dwell=5)
    d = resolve_damper(user, {"dwell": 2, "loss_fraction": 0.25})
    assert d is not user
    assert d.get_params() == {"initial": 16, "dwell": 2, "best_loss": 0.0, "loss_fraction": 0.25}
    assert user.get_params() == {"initial": 16, "dwell": 5, "best_loss": 0.0, "loss_fraction": 1.0}
    # learned state of the copy stays out of the user's object
    d.damping(TrainState(n_examples=10, train_loss=1.0))
    assert d.initial_loss_ == 1.0 and user.initial_loss_ is None


@pytest.mark.parametrize("bad", [32.0, True, "32", None, int, TrainState, BaseDamper])
def test_resolve_rejects_other_types(bad):
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, a damper class"):
        resolve_damper(bad, {})


@pytest.mark.parametrize("bad", [0, -4])
def test_resolve_rejects_non_positive_int(bad):
    with pytest.raises(ValueError, match=r"batch_size .*got " + str(bad)):
        resolve_damper(bad, {})


def test_resolve_int_with_params():
    with pytest.raises(ValueError, match="batch_size__delay"):
        resolve_damper(32, {"delay": 3})


def test_resolve_unknown_keys_named_with_accepted_list():
    msg = (
        r"batch_size__dellay.*GeoDamp.*"
        r"batch_size__initial, batch_size__delay, batch_size__factor"
    )
    with pytest.raises(ValueError, match=msg):
        resolve_damper(GeoDamp, {"dellay": 3})
    both = r"batch_size__a, batch_size__b: not a parameter of AdaDamp"
    with pytest.raises(ValueError, match=both):
        resolve_damper(AdaDamp(), {"b": 1, "a": 2})
    with pytest.raises(ValueError, match="GradientDescent takes no parameters"):
        resolve_damper(GradientDescent, {"initial": 2})


@pytest.mark.parametrize(
    "cls, params, name",
    [
        (GeoDamp, {"factor": 0.5}, "factor"),
        (GeoDamp, {"delay": 0}, "delay"),
        (GeoDamp, {"initial": 0}, "initial"),
        (GeoDampLR, {"factor": True}, "factor"),
        (PadaDamp, {"rate": -1}, "rate"),
        (PadaDamp, {"initial": -2}, "initial"),
        (CntsDampLR, {"rate": -0.1}, "rate"),
        (CntsDampLR, {"initial": 0}, "initial"),
        (AdaDamp, {"dwell": 0}, "dwell"),
        (AdaDamp, {"dwell": 1.5}, "dwell"),
        (AdaDamp, {"initial": 0}, "initial"),
        (AdaDamp, {"loss_fraction": 0}, "loss_fraction"),
        (AdaDamp, {"loss_fraction": 1.5}, "loss_fraction"),
        (AdaDamp, {"best_loss": float("nan")}, "best_loss"),
        (RadaDamp, {"rho": 1.0}, "rho"),
        (RadaDamp, {"rho": -0.1}, "rho"),
        (RadaDamp, {"initial": 0}, "initial"),
        (RadaDamp, {"signal": "gradient"}, "signal"),
        (Constant, {"initial": 0}, "initial"),
    ],
)
def test_resolve_validates_ranges(cls, params, name):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {name} must"):
        resolve_damper(cls, params)
    # the same check runs when the value is set on an instance's copy
    with pytest.raises(ValueError, match=rf"{cls.__name__}: {name} must"):
        resolve_damper(cls(), params)


def test_boundary_values_accepted():
    resolve_damper(GeoDamp, {"factor": 1})
    resolve_damper(PadaDamp, {"rate": 0})
    resolve_damper(AdaDamp, {"loss_fraction": 1.0, "dwell": 1})
    resolve_damper(RadaDamp, {"rho": 0.0})


def test_dampers_registry_and_repr():
    assert DAMPERS["GeoDamp"] is GeoDamp and DAMPERS["AdaDamp"] is AdaDamp
    assert all(issubclass(c, BaseDamper) for c in DAMPERS.values())
    assert {
        "Constant",
        "GeoDampLR",
        "PadaDamp",
        "CntsDampLR",
        "GradientDescent",
        "RadaDamp",
    } <= set(DAMPERS)
    # every registered damper is usable with its defaults
    for cls in DAMPERS.values():
        assert type(resolve_damper(cls, {})) is cls
    assert repr(PadaDamp(initial=4, rate=0.5)) == "PadaDamp(initial=4, rate=0.5)"
    assert repr(GradientDescent()) == "GradientDescent()"
