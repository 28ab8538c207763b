"""The Smith et al. schedules, and ``adadamp compare`` / ``adadamp train`` end to end."""

from __future__ import annotations

import json
import math

import pytest

from adadamp.cli import main
from adadamp.dampers import GeoDamp, GeoDampLR, GNSDamp
from adadamp.experiments.schedules import (
    GNS_KAPPA,
    SCHEDULE_NAMES,
    SMITH_NAMES,
    compare_schedules,
    increase_epochs,
    schedule_delay,
    smith_schedules,
)
from adadamp.schedule import plan_epochs


def _plan(schedule, n, epochs):
    """Per epoch: the batch sizes and the learning-rate factors of its updates."""
    plans = plan_epochs(schedule.damper, n, epochs, schedule.max_batch_size)
    return [[p.batch_size for p in e] for e in plans], [[p.lr_factor for p in e] for e in plans]


# ---------------------------------------------------------------- definitions


def test_delay_matches_smith_fractions():
    assert schedule_delay(200) == 60
    assert increase_epochs(200) == [60, 120, 180]
    assert increase_epochs(20) == [6, 12, 18]
    assert increase_epochs(10) == [3, 6, 9]
    assert increase_epochs(2) == [1]
    assert increase_epochs(1) == []


def test_never_more_than_three_increases():
    for epochs in range(1, 1001):
        delay = schedule_delay(epochs)
        assert delay >= 1
        assert 4 * delay >= epochs, epochs  # a fourth increase would start after the run
        assert len(increase_epochs(epochs)) <= 3


def test_schedule_definitions():
    by_name = {s.name: s for s in smith_schedules(20, initial_batch_size=16, lr=0.1)}
    assert tuple(by_name) == SMITH_NAMES
    dec = by_name["Dec. LR"]
    assert type(dec.damper) is GeoDampLR
    assert (dec.damper.initial, dec.damper.delay, dec.damper.factor) == (16, 6, 5)
    for name, cap, initial in [
        ("Hybrid inc-1", 80, 16),
        ("Hybrid inc-2", 400, 16),
        ("Inc. BS", None, 16),
        ("Hybrid*2", 640, 32),
    ]:
        s = by_name[name]
        assert type(s.damper) is GeoDamp
        assert (s.damper.initial, s.damper.delay, s.damper.factor) == (initial, 6, 5)
        assert s.max_batch_size == cap
    assert all(s.lr == 0.1 for s in by_name.values())
    assert dec.effective_max_batch_size == 16
    assert by_name["Inc. BS"].effective_max_batch_size is None


def test_compare_adds_gnsdamp_with_one_kappa():
    rows = compare_schedules(20, initial_batch_size=16, lr=0.1)
    assert tuple(s.name for s in rows) == SCHEDULE_NAMES == (*SMITH_NAMES, "GNSDamp")
    gns = rows[-1]
    assert type(gns.damper) is GNSDamp
    assert (gns.damper.initial, gns.damper.kappa, gns.max_batch_size, gns.lr) == (
        16,
        GNS_KAPPA,
        None,
        0.1,
    )


def test_paper_update_counts():
    # CIFAR-10, 200 epochs, initial batch 128: the paper's table of model updates.
    expected = {
        "Dec. LR": 78_200,
        "Hybrid inc-1": 34_520,
        "Hybrid inc-2": 29_480,
        "Inc. BS": 29_240,
        "Hybrid*2": 14_960,
    }
    for s in smith_schedules(200, initial_batch_size=128, lr=0.05):
        plans = plan_epochs(s.damper, 50_000, 200, s.max_batch_size)
        assert sum(len(e) for e in plans) == expected[s.name], s.name


def test_hand_computed_sequences():
    # 10 epochs (increases after epochs 3, 6, 9), 100 examples, initial batch 4.
    n, epochs = 100, 10
    by_name = {s.name: s for s in smith_schedules(epochs, initial_batch_size=4)}
    epoch_sizes = {  # batch size of each epoch's full updates; last update takes the rest
        "Dec. LR": [4] * 10,
        "Hybrid inc-1": [4] * 3 + [20] * 7,
        "Hybrid inc-2": [4] * 3 + [20] * 3 + [100] * 4,
        "Inc. BS": [4] * 3 + [20] * 3 + [100] * 3 + [500],
        "Hybrid*2": [8] * 3 + [40] * 3 + [160] * 4,  # capped at 8 * 20
    }
    epoch_lr = {
        "Dec. LR": [1] * 3 + [1 / 5] * 3 + [1 / 25] * 3 + [1 / 125],
        "Hybrid inc-1": [1] * 6 + [1 / 5] * 3 + [1 / 25],
        "Hybrid inc-2": [1] * 9 + [1 / 5],
        "Inc. BS": [1] * 10,
        # Requests 200 (epochs 6-8) and 1000 (epoch 9) against a cap of 160.
        "Hybrid*2": [1] * 6 + [160 / 200] * 3 + [160 / 1000],
    }
    for name, schedule in by_name.items():
        sizes, factors = _plan(schedule, n, epochs)
        for e, (epoch, size) in enumerate(zip(sizes, epoch_sizes[name])):
            size = min(size, n)  # an epoch holds n examples
            full, rest = divmod(n, size)
            assert epoch == [size] * full + ([rest] if rest else []), (name, e)
        for e, (epoch, lr) in enumerate(zip(factors, epoch_lr[name])):
            assert all(math.isclose(f, lr) for f in epoch), (name, e, epoch)


@pytest.mark.parametrize("batch", [16, 32])
def test_update_ratios_at_default_scale(batch):
    # The digits run: 1437 training images, 20 epochs.
    counts = {}
    for s in smith_schedules(20, initial_batch_size=batch):
        counts[s.name] = sum(len(e) for e in plan_epochs(s.damper, 1437, 20, s.max_batch_size))
    per_epoch = [math.ceil(1437 / (batch * 5**k)) for k in range(4)]
    assert counts["Dec. LR"] == 20 * per_epoch[0]
    assert counts["Inc. BS"] == 6 * sum(per_epoch[:3]) + 2 * per_epoch[3]
    assert counts["Dec. LR"] / counts["Inc. BS"] >= 2.5
    assert counts["Dec. LR"] / counts["Hybrid*2"] >= 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 2, "initial_batch_size": 0},
        {"epochs": 2, "lr": -1.0},
        {"epochs": 2.5},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        smith_schedules(**kwargs)


# ---------------------------------------------------------------- end to end


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--epochs",
            "2",
            "--n-train",
            "300",
            "--seeds",
            "1",
            "--batch-size",
            "16",
            "--backend",
            "local",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    for name in SCHEDULE_NAMES:
        assert name in printed
    assert "model updates" in printed and "max workers" in printed
    assert "rescaling (s)" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert [row["schedule"] for row in summary] == list(SCHEDULE_NAMES)
    by_name = {row["schedule"]: row for row in summary}
    for row in summary:
        for key in ("test_accuracy", "model_updates", "examples", "wall_clock_s"):
            assert key in row
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["examples"] == 2 * 300
        assert row["wall_clock_s"] > 0
        assert row["model_updates"] > 0
    # Epoch 1 at batch 16 (19 updates), epoch 2 at 80 (4 updates).
    assert by_name["Dec. LR"]["model_updates"] == 2 * 19
    assert by_name["Inc. BS"]["model_updates"] == 19 + 4
    assert by_name["Inc. BS"]["model_updates"] < by_name["Dec. LR"]["model_updates"]
    assert by_name["Hybrid*2"]["max_batch_size"] == 160
    # Two epochs on 300 digits are enough to beat chance (10 %).
    assert by_name["Dec. LR"]["test_accuracy"] > 0.2

    for name in (
        "accuracy_loss_vs_epochs.png",
        "accuracy_loss_vs_model_updates.png",
        "accuracy_loss_vs_wall_clock.png",
        "accuracy_loss_vs_simulated_wall_clock.png",
        "schedules.png",
        "history.csv",
        "history.json",
    ):
        assert (out / name).stat().st_size > 0, name
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {
        "schedule",
        "seed",
        "epoch",
        "test_accuracy",
        "train_loss",
        "model_updates",
        "examples",
        "wall_clock_s",
        "rescale_s",
        "sim_wall_clock_s",
    } <= set(header)


def test_compare_rejects_unknown_dataset(tmp_path):
    with pytest.raises(SystemExit):
        main(["compare", "--dataset", "cifar10", "--out", str(tmp_path)])


def test_train_prints_table_and_accuracy(capsys):
    assert main(["train", "--epochs", "2", "--backend", "local"]) == 0
    printed = capsys.readouterr().out
    for column in ("batch_size", "lr", "model_updates", "test_acc", "train_loss"):
        assert column in printed
    assert "test accuracy:" in printed


def test_compare_augment_flag_trains_on_shifted_digits(tmp_path, capsys):
    def run(*flags: str) -> dict:
        out = tmp_path / ("augmented" if flags else "plain")
        args = ["compare", "--epochs", "1", "--n-train", "64", "--seeds", "1"]
        args += ["--batch-size", "16", "--schedules", "Dec. LR", "--backend", "local"]
        assert main([*args, "--no-progress", "--out", str(out), *flags]) == 0
        config = json.loads((out / "config.json").read_text())
        (row,) = json.loads((out / "summary.json").read_text())
        return {"config": config, "row": row, "printed": capsys.readouterr().out}

    plain, augmented = run(), run("--augment")
    assert augmented["config"]["augment"] is True and plain["config"]["augment"] is False
    assert "random shifts of up to 1 pixel" in augmented["printed"]
    assert "random shifts" not in plain["printed"]
    # Same seed, same initial weights and order: only the shifted inputs differ.
    assert augmented["row"]["model_updates"] == plain["row"]["model_updates"] == 4
    assert augmented["row"]["final_train_loss"] != plain["row"]["final_train_loss"]
    assert 0.0 <= augmented["row"]["test_accuracy"] <= 1.0
