"""The wall-clock model: formulas on hand-computed cases, runs, the CLI, the paper table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adadamp.cli import main
from adadamp.dampers import GeoDamp
from adadamp.simulate import (
    NETWORKS,
    PAPER_CENTRALIZED_OVERHEAD_S,
    T4_SECONDS_PER_EXAMPLE,
    Centralized,
    Decentralized,
    Network,
    PlannedRun,
    paper_table,
    resolve,
    simulate_run,
    update_time,
)

# 1e6 bytes over 8e9 bit/s: exactly 1 ms per copy of the model, 1 us latency.
NET = Network(bandwidth_bps=8e9, latency_s=1e-6)
MODEL = dict(n_params=250_000, bytes_per_param=4)


def test_presets_are_the_papers_networks():
    net, arch = NETWORKS["decentralized-moderate"]
    assert (net.bandwidth_bps, net.latency_s) == (54e9, 0.05e-6)
    assert isinstance(arch, Decentralized) and arch.overhead_s == 0
    net, arch = NETWORKS["decentralized-high"]
    assert (net.bandwidth_bps, net.latency_s) == (800e9, 0.025e-6)
    net, arch = NETWORKS["centralized"]
    assert net == NETWORKS["decentralized-moderate"][0]
    assert isinstance(arch, Centralized)
    assert arch.overhead_s == pytest.approx(0.05856 + 0.011)


def test_one_decentralized_worker_only_computes():
    t = update_time(128, 1, network="decentralized-moderate")
    assert t.communication_s == 0 and t.overhead_s == 0
    assert t.total_s == pytest.approx(128 * T4_SECONDS_PER_EXAMPLE)


def test_ring_all_reduce_by_hand():
    # P = 4: 2 * 3/4 * 1 ms + 2 * 3 * 1 us.
    t = update_time(512, 4, network=NET, architecture="decentralized", **MODEL)
    assert t.communication_s == pytest.approx(1.5e-3 + 6e-6)
    # The bandwidth part tends to 2 M / bandwidth: it barely grows with P.
    t100 = update_time(512, 100, network=NET, architecture="decentralized", **MODEL)
    assert t100.communication_s == pytest.approx(2 * 99 / 100 * 1e-3 + 2 * 99 * 1e-6)


def test_parameter_server_grows_linearly_with_workers():
    arch = Centralized(overhead_s=0.0)
    comm = [
        update_time(512, p, network=NET, architecture=arch, **MODEL).communication_s
        for p in (1, 2, 4, 8)
    ]
    # 2 P * 1 ms + 2 * 1 us; a round trip even for one worker.
    assert comm == pytest.approx([2e-3 + 2e-6, 4e-3 + 2e-6, 8e-3 + 2e-6, 16e-3 + 2e-6])
    assert np.diff(comm) == pytest.approx([2e-3, 4e-3, 8e-3])
    for p in (1, 2, 4, 8, 64):
        ring = update_time(512, p, network=NET, architecture="decentralized", **MODEL)
        server = update_time(512, p, network=NET, architecture=arch, **MODEL)
        assert server.communication_s > ring.communication_s


def test_overhead_per_update_and_per_extra_worker():
    assert update_time(128, 1, network="centralized").overhead_s == pytest.approx(
        PAPER_CENTRALIZED_OVERHEAD_S
    )
    arch = Decentralized(overhead_s=0.01, overhead_per_worker_s=0.002)
    assert update_time(384, 3, network=NET, architecture=arch).overhead_s == pytest.approx(0.014)


def test_compute_uses_the_largest_slice():
    spe = 0.001
    assert update_time(
        128, 2, network=NET, architecture="decentralized", seconds_per_example=spe
    ).compute_s == pytest.approx(0.064)
    # 129 examples on 2 workers: one worker has 65.
    assert update_time(
        129, 2, network=NET, architecture="decentralized", seconds_per_example=spe
    ).compute_s == pytest.approx(0.065)


def test_workers_follow_the_batch_size():
    res = simulate_run(
        [128, 129, 256, 1000, 5000, 64],
        network="decentralized-high",
        grads_per_worker=128,
        max_workers=10,
    )
    assert res.workers.tolist() == [1, 2, 2, 8, 10, 1]
    assert res.max_workers == 10
    res = simulate_run([64, 64], network="decentralized-high", grads_per_worker=128, min_workers=3)
    assert res.workers.tolist() == [3, 3]


def test_total_is_the_sum_of_update_times():
    sizes = [128, 640, 640, 3200, 80]
    res = simulate_run(sizes, network="centralized", grads_per_worker=128)
    assert res.total_seconds == pytest.approx(res.update_seconds.sum())
    assert res.update_seconds == pytest.approx(res.compute_s + res.communication_s + res.overhead_s)
    for b, p, t in zip(sizes, res.workers, res.update_seconds):
        assert t == pytest.approx(update_time(int(b), int(p), network="centralized").total_s)


def test_full_batch_sizes_size_the_workers():
    # The last update of an epoch is short but keeps the epoch's workers.
    res = simulate_run(
        [300, 300, 100],
        full_batch_sizes=[300, 300, 300],
        network=NET,
        architecture="decentralized",
        grads_per_worker=100,
    )
    assert res.workers.tolist() == [3, 3, 3]
    assert res.compute_s[2] == pytest.approx(34 * T4_SECONDS_PER_EXAMPLE)


def test_a_schedule_keeps_the_epochs_workers_for_its_last_update():
    res = simulate_run(
        PlannedRun(GeoDamp(initial=300, delay=100, factor=1), 1000, 2),
        network="decentralized-high",
        grads_per_worker=100,
    )
    assert res.batch_sizes.tolist() == [300, 300, 300, 100] * 2
    assert res.workers.tolist() == [3] * 8


def test_rescale_is_charged_when_the_workers_change():
    arch = Decentralized(rescale_s=2.0)
    res = simulate_run(
        [128, 128, 256, 256, 128], network=NET, architecture=arch, grads_per_worker=128
    )
    assert res.overhead_s.tolist() == [0, 0, 2.0, 0, 2.0]


def test_a_larger_max_batch_size_never_gives_more_updates():
    counts = [
        simulate_run(PlannedRun(GeoDamp(initial=32, delay=2, factor=4), 3_000, 10, cap)).n_updates
        for cap in (32, 128, 512, 2048, None)
    ]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1]


def test_history_forms_and_recorded_workers():
    flat = [{"batch_size": 128, "workers": 1}, {"batch_size": 640, "workers": 3}]
    epochs = [{"epoch": 1, "batches": flat[:1]}, {"epoch": 2, "batches": flat[1:]}]
    a = simulate_run(flat, network="decentralized-moderate")
    b = simulate_run(epochs, network="decentralized-moderate")
    c = simulate_run([128, 640], network="decentralized-moderate")
    assert a.total_seconds == b.total_seconds == c.total_seconds
    assert a.workers.tolist() == [1, 5]
    d = simulate_run(flat, network="decentralized-moderate", workers=[r["workers"] for r in flat])
    assert d.workers.tolist() == [1, 3]


def test_bad_input_names_the_parameter():
    with pytest.raises(ValueError, match="bandwidth_bps"):
        Network(0, 0)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("token-ring")
    with pytest.raises(ValueError, match="architecture"):
        resolve(NET)
    with pytest.raises(ValueError, match="overhead_s"):
        Centralized(overhead_s=-1)
    with pytest.raises(ValueError, match="batch_size"):
        simulate_run([128, 0])
    with pytest.raises(ValueError, match="workers"):
        simulate_run([128, 128], workers=[1])


@pytest.fixture(scope="module")
def table():
    return paper_table()


def test_paper_schedules_match_the_papers_counts(table):
    assert [r.updates for r in table.rows] == [78_200, 34_520, 29_480, 29_240, 14_960]
    assert [r.updates for r in table.rows] == [r.paper_updates for r in table.rows]
    assert [r.max_workers for r in table.rows] == [1, 5, 25, 125, 40]
    assert [r.max_workers for r in table.rows] == [r.paper_max_workers for r in table.rows]


def test_paper_table_fit_is_stated_and_closer(table):
    for name, (a, b) in table.fitted.items():
        assert a >= 0 and b >= 0
        model_err = sum((r.minutes[name] - r.paper_minutes[name]) ** 2 for r in table.rows)
        fitted_err = sum((r.fitted_minutes[name] - r.paper_minutes[name]) ** 2 for r in table.rows)
        assert fitted_err < model_err
    # Unfitted, one decentralized worker only computes: 200 epochs x 50,000 examples.
    one = table.rows[0]
    assert one.minutes["decentralized-moderate"] == pytest.approx(
        200 * 50_000 * T4_SECONDS_PER_EXAMPLE / 60
    )


def _expected_total_line(res) -> str:
    return f"total: {res.total_minutes:.2f} minutes"


def test_cli_schedule_end_to_end(capsys):
    argv = [
        "simulate",
        "--network",
        "centralized",
        "--initial",
        "64",
        "--factor",
        "4",
        "--delay",
        "2",
        "--epochs",
        "6",
        "--n-examples",
        "5000",
        "--max-batch-size",
        "1024",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    res = simulate_run(
        PlannedRun(GeoDamp(initial=64, delay=2, factor=4), 5000, 6, 1024), network="centralized"
    )
    assert _expected_total_line(res) in out
    assert f"{res.n_updates:,} updates" in out
    assert "54 Gb/s" in out and "centralized (parameter server)" in out
    assert f"up to {res.max_workers} workers" in out


def test_cli_custom_network_and_overhead(capsys):
    argv = [
        "simulate",
        "--bandwidth",
        "1",
        "--latency",
        "10",
        "--architecture",
        "centralized",
        "--overhead",
        "0.2",
        "--epochs",
        "2",
        "--n-examples",
        "1000",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    arch = Centralized(overhead_s=0.2)
    res = simulate_run(
        PlannedRun(GeoDamp(128, 60, 5), 1000, 2), network=Network(1e9, 10e-6), architecture=arch
    )
    assert "1 Gb/s, 10 us latency" in out and "200.00 ms/update" in out
    assert _expected_total_line(res) in out


def test_cli_history_json_and_csv(tmp_path, capsys):
    records = [{"batch_size": 128, "workers": 1}] * 10 + [{"batch_size": 1280, "workers": 4}] * 5
    path = tmp_path / "history.json"
    path.write_text(json.dumps(records))
    assert main(["simulate", "--history", str(path), "--network", "decentralized-high"]) == 0
    out = capsys.readouterr().out
    res = simulate_run(records, network="decentralized-high")
    assert _expected_total_line(res) in out and "15 updates" in out and "up to 10 workers" in out

    csv_path = tmp_path / "history.csv"
    csv_path.write_text(
        "batch_size,workers\n" + "\n".join(f"{r['batch_size']},{r['workers']}" for r in records)
    )
    assert (
        main(
            [
                "simulate",
                "--history",
                str(csv_path),
                "--network",
                "decentralized-high",
                "--recorded-workers",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    res = simulate_run(
        records, network="decentralized-high", workers=[r["workers"] for r in records]
    )
    assert _expected_total_line(res) in out and "up to 4 workers" in out


def test_cli_rejects_history_with_schedule(tmp_path, capsys):
    path = tmp_path / "h.json"
    path.write_text("[]")
    assert main(["simulate", "--history", str(path), "--epochs", "3"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_cli_paper_prints_the_papers_figures(capsys):
    assert main(["simulate", "--paper"]) == 0
    out = capsys.readouterr().out
    for figure in ("78,200", "34,520", "29,480", "29,240", "14,960"):
        assert figure in out
    time_rows = [line for line in out.splitlines() if line.count(".") >= 9]
    expected = {
        "128": ("200.19", "121.7", "121.5"),
        "640": ("116.86", "73.6", "71.8"),
        "3.2k": ("107.17", "67.7", "65.5"),
        "16k": ("107.49", "67.7", "65.7"),
        "5.1k": ("69.87", "45.1", "43.5"),
    }
    assert len(time_rows) == 5
    for row in time_rows:
        label = row.split()[0]
        for figure in expected[label]:
            assert figure in row.split()
    assert "fitted" in out


def test_package_exports_the_model_and_the_paper():
    import adadamp.simulate as package
    from adadamp.simulate import model, paper

    assert set(package.__all__) == set(model.__all__) | set(paper.__all__)
    for name in model.__all__:
        assert getattr(package, name) is getattr(model, name), name
    for name in paper.__all__:
        assert getattr(package, name) is getattr(paper, name), name
