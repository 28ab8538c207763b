"""Training in pieces equals training in one go: partial_fit, warm_start, checkpoints."""

from __future__ import annotations

import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, updates, weights  # noqa: F401
from skorch.callbacks import Checkpoint, LoadInitState

from adadamp.dampers import AdaDamp, GeoDamp, PadaDamp, RadaDamp
from adadamp.estimators import DaskClassifier

N = 200
EPOCHS = 4

# Dampers whose batch sizes change within these four epochs; the adaptive ones
# carry state (initial loss, moving average) that a resumed run must restore.
DAMPERS = {
    "geodamp": dict(
        batch_size=GeoDamp, batch_size__initial=8, batch_size__delay=1, batch_size__factor=2
    ),
    "padadamp": dict(batch_size=PadaDamp, batch_size__initial=8, batch_size__rate=2),
    "adadamp": dict(batch_size=AdaDamp, batch_size__initial=8, batch_size__dwell=3),
    "radadamp": dict(batch_size=RadaDamp, batch_size__initial=8, batch_size__rho=0.5),
}


def classifier(damper: str, **params) -> DaskClassifier:
    # SGD with momentum: the optimizer's own state must carry over as well.
    defaults = dict(
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=EPOCHS,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    return DaskClassifier(MLP, **{**defaults, **DAMPERS[damper], **params})


@pytest.fixture(scope="module")
def data():
    return digits(N)


@pytest.fixture(scope="module")
def reference(data):
    """One uninterrupted fit of EPOCHS epochs per damper, from seeded weights."""
    runs = {}
    for name in DAMPERS:
        torch.manual_seed(0)
        runs[name] = classifier(name).fit(*data)
    return runs


def assert_same_run(est, ref):
    assert updates(est, "train_batch_size") == updates(ref, "train_batch_size")
    assert updates(est, "damping") == updates(ref, "damping")
    assert updates(est, "lr") == updates(ref, "lr")
    assert est.history_[:, "model_updates"] == ref.history_[:, "model_updates"]
    assert est.history_[:, "examples"] == ref.history_[:, "examples"]
    assert est.damper_.state_dict() == ref.damper_.state_dict()
    # The same operations in the same order on one thread: the same bits.
    for mine, theirs in zip(weights(est), weights(ref)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_reference_runs_change_the_batch_size(reference):
    # Otherwise the comparisons below would not test that a schedule continues.
    for name, ref in reference.items():
        assert len(set(updates(ref, "train_batch_size"))) > 2, name
        assert len(ref.history_) == EPOCHS


@pytest.mark.parametrize("damper", DAMPERS)
def test_partial_fit_continues_the_schedule(damper, data, reference):
    torch.manual_seed(0)
    est = classifier(damper, max_epochs=2).fit(*data)
    est.partial_fit(*data)
    assert_same_run(est, reference[damper])


@pytest.mark.parametrize("damper", ["padadamp", "adadamp"])
def test_partial_fit_one_epoch_at_a_time(damper, data, reference):
    torch.manual_seed(0)
    est = classifier(damper, max_epochs=1).fit(*data)
    for _ in range(EPOCHS - 1):
        est.partial_fit(*data, epochs=1)
    assert_same_run(est, reference[damper])


@pytest.mark.parametrize("damper", ["geodamp", "padadamp"])
def test_warm_start_continues_the_schedule(damper, data, reference):
    torch.manual_seed(0)
    est = classifier(damper, max_epochs=2, warm_start=True)
    est.fit(*data)
    est.fit(*data)
    assert_same_run(est, reference[damper])


def test_fit_without_warm_start_starts_over(data, reference):
    torch.manual_seed(0)
    est = classifier("padadamp", max_epochs=2).fit(*data)
    first = updates(est, "train_batch_size")
    est.fit(*data)
    assert updates(est, "train_batch_size") == first
    assert est.history_[-1]["model_updates"] == len(first)


@pytest.mark.parametrize("damper", DAMPERS)
def test_resume_from_saved_params_in_a_new_estimator(damper, data, reference, tmp_path):
    files = dict(
        f_params=tmp_path / "params.pt",
        f_optimizer=tmp_path / "optimizer.pt",
        f_history=tmp_path / "history.json",
    )
    torch.manual_seed(0)
    classifier(damper, max_epochs=2).fit(*data).save_params(**files)

    torch.manual_seed(1)  # the new estimator's own initial weights must not matter
    est = classifier(damper, max_epochs=2)
    est.initialize()
    est.load_params(**files)
    est.partial_fit(*data)
    assert_same_run(est, reference[damper])


@pytest.mark.parametrize("damper", ["padadamp", "radadamp"])
def test_resume_with_skorch_checkpoint_callbacks(damper, data, reference, tmp_path):
    def checkpoint():
        # monitor=None: save after every epoch (there is no validation loss here).
        return Checkpoint(monitor=None, dirname=str(tmp_path), f_criterion=None)

    torch.manual_seed(0)
    classifier(damper, max_epochs=2, callbacks=[("checkpoint", checkpoint())]).fit(*data)

    torch.manual_seed(1)
    cp = checkpoint()
    est = classifier(
        damper, max_epochs=2, callbacks=[("checkpoint", cp), ("load", LoadInitState(cp))]
    )
    est.fit(*data)  # LoadInitState restores the checkpoint when training begins
    assert_same_run(est, reference[damper])


def _save_after_two_epochs(damper, data, tmp_path, **params):
    files = dict(
        f_params=tmp_path / "params.pt",
        f_optimizer=tmp_path / "optimizer.pt",
        f_history=tmp_path / "history.json",
    )
    torch.manual_seed(0)
    classifier(damper, max_epochs=2, **params).fit(*data).save_params(**files)
    return files


def test_resumed_estimator_keeps_its_own_damper_params(data, tmp_path):
    files = _save_after_two_epochs("geodamp", data, tmp_path)
    est = classifier("geodamp", max_epochs=1, batch_size__factor=3)
    est.initialize()
    est.load_params(**files)
    est.partial_fit(*data)
    # The counters continue (e = 2) under the new estimator's factor: 8 * 3**2.
    assert est.history_[:, "batch_size"] == [8, 16, 72]
    assert est.damper_.factor == 3


def test_resume_under_another_damper_class(data, tmp_path):
    files = _save_after_two_epochs("adadamp", data, tmp_path)
    est = classifier("padadamp", max_epochs=1)
    est.initialize()
    est.load_params(**files)
    est.partial_fit(*data)
    saved_updates = est.history_[1]["model_updates"]
    # PadaDamp keeps its own parameters and counts the updates already made.
    assert est.damper_.get_params() == {"initial": 8, "rate": 2}
    first = est.history_[-1, "batches"][0]
    assert first["damping"] == 8 + 2 * saved_updates
    assert not hasattr(est.damper_, "initial_loss_")
