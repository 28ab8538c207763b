"""DaskClassifier/DaskRegressor on the in-process engine: accuracy, the schedule in
history_, the paper's example, divergence, printed output and callbacks."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, regression, updates  # noqa: F401
from sklearn.model_selection import train_test_split
from skorch.callbacks import EarlyStopping, EpochScoring, LRScheduler
from torch.optim.lr_scheduler import StepLR

from adadamp.dampers import GeoDamp, GeoDampLR
from adadamp.estimators import DaskClassifier, DaskRegressor
from adadamp.schedule import plan_epochs


def expected_epoch(n: int, b: int) -> list[int]:
    """An epoch of n examples walked b at a time, the last batch taking the rest."""
    full = math.ceil(n / b)
    return [b] * (full - 1) + [n - (full - 1) * b]


# --------------------------------------------------------------------------- accuracy


def test_geodamp_matches_constant_batch_accuracy_with_fewer_updates():
    X, y = digits()
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=0, stratify=y
    )
    n = len(X_train)
    common = dict(
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=20,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    runs = {}
    for name, batch_size in [
        (
            "geodamp",
            {
                "batch_size": GeoDamp,
                "batch_size__initial": 16,
                "batch_size__delay": 5,
                "batch_size__factor": 2,
            },
        ),
        ("constant", {"batch_size": 16}),
    ]:
        torch.manual_seed(0)
        est = DaskClassifier(MLP, **common, **batch_size).fit(X_train, y_train)
        runs[name] = est.score(X_test, y_test), est.history_[-1]["model_updates"], est

    geo_acc, geo_updates, geo = runs["geodamp"]
    const_acc, const_updates, _ = runs["constant"]
    assert geo_acc >= 0.95
    assert abs(geo_acc - const_acc) <= 0.02
    # 5 epochs each at 16, 32, 64 and 128 against 20 epochs at 16.
    assert geo.history_[:, "batch_size"] == [16] * 5 + [32] * 5 + [64] * 5 + [128] * 5
    assert geo_updates == 5 * sum(math.ceil(n / b) for b in (16, 32, 64, 128))
    assert const_updates == 20 * math.ceil(n / 16)
    assert geo_updates < 0.5 * const_updates


# --------------------------------------------------------------------------- the paper


def test_paper_example_as_printed():
    # The "Example usage" section of the paper, in order, plus ``import torch``.
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class HiddenLayer(nn.Module):
        def __init__(self, features=4, hidden=2, out=1):
            super().__init__()
            self.hidden = nn.Linear(features, hidden)
            self.out = nn.Linear(hidden, out)

        def forward(self, x, *args, **kwargs):
            return self.out(F.relu(self.hidden(x)))

    import torch.optim as optim

    from adadamp import DaskRegressor

    est = DaskRegressor(
        module=HiddenLayer,
        module__features=10,
        optimizer=optim.Adadelta,
        optimizer__weight_decay=1e-7,
        max_epochs=10,
    )

    from adadamp.dampers import GeoDamp

    est.set_params(batch_size=GeoDamp, batch_size__delay=60, batch_size__factor=5)

    from sklearn.datasets import make_regression

    X, y = make_regression(n_features=10)
    X = torch.from_numpy(X.astype("float32"))
    y = torch.from_numpy(y.astype("float32")).reshape(-1, 1)

    est.fit(X, y)

    # It trained: one row per epoch, counters that add up, a falling loss.
    n = len(X)
    history = est.history_
    assert len(history) == 10
    assert est.damper_.get_params() == {"initial": 128, "delay": 60, "factor": 5}
    previous_updates = 0
    for epoch, row in enumerate(history, start=1):
        assert row["epochs"] == epoch
        assert row["examples"] == epoch * n
        # GeoDamp asks for 128 > n = 100: every epoch is one full-batch update.
        assert row["batch_size"] == n
        assert [b["damping"] for b in row["batches"]] == [128.0]
        assert row["model_updates"] - previous_updates == math.ceil(n / row["batch_size"])
        previous_updates = row["model_updates"]
    losses = history[:, "train_loss"]
    assert losses[-1] < losses[0]
    prediction = est.predict(X)
    assert prediction.shape == (100, 1)
    assert np.isfinite(prediction).all()


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("max_batch_size", [None, 16])
def test_history_records_the_planned_schedule(max_batch_size):
    X, y = regression(n=100)
    n, lr = len(X), 0.01
    torch.manual_seed(0)
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        lr=lr,
        max_epochs=8,
        batch_size=GeoDamp,
        batch_size__initial=8,
        batch_size__delay=2,
        batch_size__factor=2,
        max_batch_size=max_batch_size,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)

    plans = plan_epochs(GeoDamp(initial=8, delay=2, factor=2), n, 8, max_batch_size)
    assert [len(row["batches"]) for row in est.history_] == [len(epoch) for epoch in plans]
    flat = [p for epoch in plans for p in epoch]
    assert updates(est, "train_batch_size") == [p.batch_size for p in flat]
    assert updates(est, "damping") == [p.damping for p in flat]
    assert updates(est, "lr") == pytest.approx([lr * p.lr_factor for p in flat], rel=1e-12)

    # Written out, not only through plan_epochs: 8, 16, 32, 64 for two epochs each,
    # or at most 16 with the learning rate scaled by 16 / requested.
    requested = [8] * 2 + [16] * 2 + [32] * 2 + [64] * 2
    used = requested if max_batch_size is None else [min(b, 16) for b in requested]
    for row, want, b in zip(est.history_, requested, used):
        assert [u["train_batch_size"] for u in row["batches"]] == expected_epoch(n, b)
        assert {u["damping"] for u in row["batches"]} == {want}
        assert [u["lr"] for u in row["batches"]] == pytest.approx(
            [lr * b / want] * len(row["batches"]), rel=1e-12
        )
        assert row["batch_size"] == b
    assert est.history_[-1]["model_updates"] == len(flat)
    assert est.history_[-1]["examples"] == 8 * n


# --------------------------------------------------------------------------- divergence


def test_diverging_run_raises_convergence_error():
    from adadamp import ConvergenceError

    X, y = regression(n=64)
    y = y * 1e6  # targets far from the scale of the initial predictions
    lr = 10.0
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        lr=lr,
        max_epochs=50,
        batch_size=16,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    with pytest.raises(ConvergenceError) as info:
        est.fit(X, y)
    message = str(info.value)
    update = int(re.search(r"model update (\d+)", message).group(1))
    assert update >= 1
    assert re.search(r"batch size 16\b", message)
    assert re.search(r"learning rate 10\b", message)
    # The run stopped where it diverged: the updates before it are recorded, no more.
    per_epoch = math.ceil(64 / 16)
    finished = [row for row in est.history_ if "model_updates" in row]
    assert len(finished) == (update - 1) // per_epoch
    assert len(updates(est, "train_loss")) == update - 1
    # The learning rate set per update is given back to the optimizer.
    assert est.optimizer_.param_groups[0]["lr"] == lr


# --------------------------------------------------------------------------- output


def test_verbose_prints_the_epoch_table_and_the_batch_size_in_the_progress_bar(capsys, monkeypatch):
    X, y = regression(n=60)
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        lr=0.01,
        max_epochs=3,
        batch_size=GeoDamp,
        batch_size__initial=10,
        batch_size__delay=1,
        batch_size__factor=2,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=1,
    )
    # On a terminal the progress bar shows the batch size as it grows.
    with monkeypatch.context() as patch:
        patch.setattr(sys.stderr, "isatty", lambda: True)
        est.fit(X, y)
    out, err = capsys.readouterr()
    assert "batch_size=10" in err
    assert "batch_size=40" in err

    lines = [line for line in out.splitlines() if line.strip()]
    header = lines[0].split()
    for column in ("epoch", "batch_size", "lr", "model_updates", "train_loss"):
        assert column in header
    # The resume snapshot and the raw counters stay out of the table.
    for hidden in ("train_state", "examples", "epochs"):
        assert hidden not in header
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 3
    col = {name: i for i, name in enumerate(header)}
    assert [int(r[col["batch_size"]]) for r in rows] == [10, 20, 40]
    assert [int(r[col["model_updates"]]) for r in rows] == [6, 9, 11]

    # In a file or pipe (what capsys is) there is no bar redrawn with carriage
    # returns: only the table's lines.
    est.fit(X, y)
    out, err = capsys.readouterr()
    assert "\r" not in err and "batch_size=" not in err
    assert [line.split()[0] for line in out.splitlines()[-3:]] == ["1", "2", "3"]

    est.set_params(verbose=0)
    est.fit(X, y)
    out, err = capsys.readouterr()
    assert out == "" and "batch_size=" not in err


# --------------------------------------------------------------------------- callbacks


def test_geodamplr_records_decayed_lr_and_restores_the_base_lr():
    X, y = regression(n=40)
    lr = 0.1
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        lr=lr,
        max_epochs=4,
        batch_size=GeoDampLR,
        batch_size__initial=10,
        batch_size__delay=1,
        batch_size__factor=2,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)
    for k, row in enumerate(est.history_):
        assert [u["train_batch_size"] for u in row["batches"]] == [10] * 4
        assert [u["lr"] for u in row["batches"]] == pytest.approx([lr / 2**k] * 4)
        assert row["lr"] == pytest.approx(lr / 2**k)
    assert est.optimizer_.param_groups[0]["lr"] == lr


def test_lr_scheduler_callback_composes_with_the_damper():
    X, y = regression(n=40)
    lr = 0.1
    est = DaskRegressor(
        MLP,
        module__features=5,
        module__out=1,
        lr=lr,
        max_epochs=4,
        batch_size=GeoDampLR,
        batch_size__initial=10,
        batch_size__delay=1,
        batch_size__factor=2,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
        callbacks=[("step", LRScheduler(StepLR, step_size=1, gamma=0.5))],
    )
    est.fit(X, y)
    # StepLR halves the base rate after every epoch and GeoDampLR halves the rate
    # of every update per epoch: a quarter per epoch in all.
    for k, row in enumerate(est.history_):
        assert [u["lr"] for u in row["batches"]] == pytest.approx([lr / 4**k] * 4)
    # What the scheduler saw and stepped was its own base rate, never a damped one.
    assert est.history_[:, "event_lr"] == pytest.approx([lr / 2**k for k in range(4)])
    assert est.optimizer_.param_groups[0]["lr"] == pytest.approx(lr / 2**4)


def test_epoch_scoring_of_the_training_set():
    X, y = digits(300)
    est = DaskClassifier(
        MLP,
        lr=0.1,
        max_epochs=2,
        batch_size=16,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
        callbacks=[
            EpochScoring("accuracy", on_train=True, name="train_acc", lower_is_better=False)
        ],
    )
    est.fit(X, y)
    scores = est.history_[:, "train_acc"]
    assert len(scores) == 2
    # The callback scored the model as it stood at the end of each epoch.
    assert scores[-1] == pytest.approx(est.score(X, y))


def test_early_stopping_ends_the_run_and_restores_the_lr():
    X, y = digits(300)
    lr = 100.0  # far too large: the training loss stops improving at once
    est = DaskClassifier(
        MLP,
        lr=lr,
        max_epochs=30,
        batch_size=16,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
        callbacks=[EarlyStopping(monitor="train_loss", patience=2)],
    )
    est.fit(X, y)
    assert len(est.history_) < 30
    assert est.history_[-1]["model_updates"] == len(est.history_) * math.ceil(300 / 16)
    assert est.optimizer_.param_groups[0]["lr"] == lr


def test_default_validation_split_of_the_classifier():
    X, y = digits(300)
    est = DaskClassifier(
        MLP,
        lr=0.1,
        max_epochs=2,
        batch_size=GeoDamp,
        batch_size__initial=16,
        batch_size__delay=1,
        batch_size__factor=2,
        backend="local",
        random_state=0,
        verbose=0,
    )
    est.fit(X, y)
    # skorch's ValidSplit(5) keeps a fifth aside: the updates see 240 examples.
    assert est.history_[:, "examples"] == [240, 480]
    assert est.history_[:, "model_updates"] == [15, 15 + 8]
    for key in ("valid_loss", "valid_acc"):
        values = est.history_[:, key]
        assert len(values) == 2 and all(np.isfinite(values))
