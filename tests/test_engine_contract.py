"""The contracts between estimators, engines, dampers and data, checked directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, updates, weights  # noqa: F401

from adadamp.dampers import AdaDamp, BaseDamper, GeoDamp
from adadamp.engines import Engine, TrainConfig, check_backend, resolve_engine
from adadamp.engines.local import LocalEngine
from adadamp.estimators import DaskClassifier
from adadamp.examples import Examples, TensorExamples
from adadamp.state import TrainState


class CountingExamples(TensorExamples):
    """Tensor examples that count how many examples were taken through them."""

    taken = 0

    def take(self, indices):
        type(self).taken += len(indices)
        return super().take(indices)

    def to(self, device):
        return CountingExamples(self.X.to(device), self.y.to(device))


def _fit_parts(n: int = 120):
    X, y = digits(n)
    torch.manual_seed(0)
    module = MLP()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return module, optimizer, torch.nn.CrossEntropyLoss(), torch.from_numpy(X), torch.from_numpy(y)


def test_every_example_and_every_loss_pass_goes_through_take():
    module, optimizer, criterion, X, y = _fit_parts(120)
    examples = CountingExamples(X, y)
    assert isinstance(examples, Examples)
    engine = LocalEngine()
    engine.start(TrainConfig(seed=0), module, optimizer, criterion, examples)
    CountingExamples.taken = 0
    damper, state = AdaDamp(initial=40, dwell=2, loss_fraction=0.5), TrainState(len(examples))
    records = []
    engine.run_epoch(0, damper, state, records.append)
    # One epoch of gradients (120 examples) plus a loss pass over half the
    # set (60) at every second update, first one included.
    loss_passes = (len(records) + 1) // 2
    assert CountingExamples.taken == 120 + 60 * loss_passes
    assert state.examples_seen == 120 and state.model_updates == len(records)


class WrappedDamper(BaseDamper):
    """A damper that wraps another and declares nothing of its own."""

    needs_loss = True
    adaptive = True

    def __init__(self, inner=None):
        self.inner = inner or AdaDamp(initial=16)

    def loss_due(self, state):
        return self.inner.loss_due(state)

    def damping(self, state):
        return self.inner.damping(state)


def test_loss_fraction_is_declared_on_every_damper():
    assert BaseDamper.loss_fraction == 1.0
    assert WrappedDamper().loss_fraction == 1.0  # the whole set, unless the damper says otherwise
    assert AdaDamp(loss_fraction=0.25).loss_fraction == 0.25
    X, y = digits(100)
    est = DaskClassifier(
        MLP,
        lr=0.1,
        max_epochs=1,
        batch_size=WrappedDamper,
        backend="local",
        train_split=None,
        verbose=0,
    ).fit(X, y)
    assert updates(est, "train_batch_size")[0] == 16


def test_train_state_round_trips_through_its_state_dict():
    state = TrainState(
        100,
        model_updates=7,
        examples_seen=250,
        last_loss=np.float32(0.5),
        grad_stats={"grad_sq_norm": np.float64(2.0)},
        train_loss=0.75,
    )
    saved = state.state_dict()
    assert all(type(v) in (int, float, dict) for v in saved.values())
    restored = TrainState(1)
    restored.load_state_dict(saved)
    assert restored == state
    assert restored.epochs == 2.5
    # A snapshot of an older version has no statistics: they keep their defaults.
    old = TrainState(10)
    old.load_state_dict({"model_updates": 3, "examples": 30})
    assert (old.model_updates, old.examples_seen, old.last_loss, old.grad_stats) == (
        3,
        30,
        None,
        {},
    )


class RecordingEngine(LocalEngine):
    """The local engine, noting each fit it serves."""

    def __init__(self):
        self.starts = 0

    def start(self, config, module, optimizer, criterion, examples, client=None):
        self.starts += 1
        super().start(config, module, optimizer, criterion, examples, client)


def test_backend_takes_an_engine_class_or_instance():
    X, y = digits(100)
    params = dict(
        lr=0.1,
        max_epochs=2,
        batch_size=GeoDamp,
        batch_size__initial=20,
        batch_size__delay=1,
        batch_size__factor=2,
        train_split=None,
        random_state=0,
        verbose=0,
    )
    reference = DaskClassifier(MLP, backend="local", **params)
    torch.manual_seed(0)
    reference.fit(X, y)
    by_class = DaskClassifier(MLP, backend=RecordingEngine, **params)
    torch.manual_seed(0)
    by_class.fit(X, y)
    for a, b in zip(weights(reference), weights(by_class)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert by_class.fit_id_ is None

    engine = RecordingEngine()
    est = DaskClassifier(MLP, backend=engine, **params)
    est.fit(X, y)
    est.fit(X, y)
    assert engine.starts == 2
    assert updates(est, "train_batch_size") == [20] * 5 + [40, 40, 20]


@pytest.mark.parametrize("bad", ["gpu", 3, object(), torch.nn.Linear])
def test_a_backend_that_is_no_engine_is_refused(bad):
    with pytest.raises(
        ValueError, match="backend must be one of .* an Engine subclass or an Engine instance"
    ):
        check_backend(bad)


def test_auto_backend_is_local_without_a_client_and_decentralized_with_one():
    assert type(resolve_engine("auto")).__name__ == "LocalEngine"
    assert (
        type(resolve_engine("auto", client="tcp://127.0.0.1:8786")).__name__
        == "DecentralizedEngine"
    )
    assert resolve_engine("local").fit_id is None
    assert isinstance(resolve_engine("centralized"), Engine)


def test_a_stop_vote_ends_the_run_after_the_update_it_was_cast_in():
    from adadamp.engines._loop import RankModel, Reducer, run_updates

    module, optimizer, criterion, X, y = _fit_parts(120)
    config = TrainConfig(seed=0, epochs=1)
    model = RankModel(module, optimizer, criterion, TensorExamples(X, y), config)
    state, records = TrainState(120), []
    offset, not_run, votes = run_updates(
        model,
        GeoDamp(initial=10, delay=100),
        state,
        torch.arange(120),
        0,
        Reducer(),
        records.append,
        stop_vote=lambda: 2 if state.model_updates == 2 else 0,  # cast in the third update
    )
    assert len(records) == 3 and state.model_updates == 3
    assert offset == 30
    assert not_run is not None and not_run.batch_size == 10
    assert votes == 2  # the code cast, for the caller to act on
