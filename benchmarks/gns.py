"""What the gradient-noise statistics cost per model update, on 1 and 2 workers.

The same fit twice per engine, with the statistics off and on: a constant
batch of 256 (``Constant(256)``) with ``lr_scaling="none"`` (nothing reads
the statistics, so none are computed) and with ``lr_scaling="adascale"``
(AdaScale reads them; at a constant batch its gain is 1, so both fits take
the same steps). The models and data are those of ``overhead.py`` (MLP
classifiers of about 2 ms and 50 ms per update on one core). What the
statistics add is the per-piece gradient norms and, on one rank, computing
the batch in two halves on every ``SPLIT_EVERY``-th update (see
:mod:`adadamp.gns` and :func:`adadamp.engines._step.stats_span`).

Figure: ``stats_cost`` per engine and size, ``(on - off) / off`` of the
steady-state time of one update (the mean of the per-update ``duration``
records over every epoch but the first, each epoch's first update left out:
``overhead.steady``), the median over ``--repeats`` interleaved repeats.
Target (reported, not asserted): under 5% on 1 and 2 workers.

Beside it, a diagnostic that this machine's noise does not swamp (whole
fits of the same code vary by 10 to 20% here): the statistics' own work,
timed alone in this process with the package's functions, per update of
``BATCH_SIZE`` examples. On a rank of two, one piece's norm, the reduced
gradient's norm and the averages (``rank_of_two``); on a lone rank, an
update that estimates computes its batch in two halves and their norms, so
the figure is that update's extra time over a whole one, spread over
``SPLIT_EVERY`` updates (``lone_rank``). Each is also given as a share of
the fits' update time with the statistics off.

Run from the repository root::

    python benchmarks/gns.py --quick   # smoke run: small model, 1 repeat (< 1 minute)
    python benchmarks/gns.py           # full run: both models, 3 repeats

It prints the figures and writes ``benchmarks/results/gns.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import timeit
import warnings
from pathlib import Path

import torch
from overhead import BATCH_SIZE, LR, MLP, SIZES, make_data, scale_cluster, steady

from adadamp import gns
from adadamp.engines import _step
from adadamp.experiments.runtime import freeze_what_is_held

RESULTS = Path(__file__).resolve().parent / "results" / "gns.json"
FULL = {"small": (60, 3), "large": (16, 3)}
QUICK = {"small": (12, 2)}
ENGINES = (("local", 1), ("decentralized", 1), ("decentralized", 2))
TARGET = 0.05


def run(hidden, X, y, epochs: int, backend: str, workers: int, client, stats: bool) -> float:
    """Seconds of one steady-state update of one fit."""
    from adadamp import DaskClassifier
    from adadamp.dampers import Constant

    kwargs = {} if backend == "local" else {"client": client}
    est = DaskClassifier(
        MLP,
        module__hidden=hidden,
        optimizer=torch.optim.SGD,
        lr=LR,
        batch_size=Constant(BATCH_SIZE),
        lr_scaling="adascale" if stats else "none",
        max_epochs=epochs,
        train_split=None,
        verbose=0,
        backend=backend,
        min_workers=workers,
        max_workers=workers,
        random_state=0,
        **kwargs,
    )
    torch.manual_seed(0)
    freeze_what_is_held()  # untimed, as in overhead.py: no full collection inside a fit
    est.fit(X, y)
    batches = est.history_[:, "batches"]
    if stats != any("gns_trace" in u for epoch in batches for u in epoch):
        raise RuntimeError(f"statistics {'missing' if stats else 'computed'} in a fit")
    return statistics.fmean(steady([[u["duration"] for u in epoch] for epoch in batches]))


def _best_seconds(fn, number: int = 50, repeat: int = 15) -> float:
    """The least time of one call over ``repeat`` rounds: noise only ever adds."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def statistics_work(hidden, X, y) -> dict[str, float]:
    """Seconds per update that the statistics add, timed alone (see the module docstring)."""
    module = MLP(hidden=hidden)
    criterion = torch.nn.CrossEntropyLoss()
    params = list(module.parameters())
    X, y = torch.from_numpy(X[:BATCH_SIZE]), torch.from_numpy(y[:BATCH_SIZE])
    averages = gns.smoothed({}, {"gns_grad_sq": 1.0, "gns_trace": 100.0})

    def gradient(micro: int | None, norms=None) -> None:
        for p in params:
            p.grad = None
        _step.accumulate_gradient(module, criterion, X, y, BATCH_SIZE, micro, norms)

    def finish(piece_sq: float, pieces: int, tensors) -> None:
        mean_sq = _step.squared_norm(tensors)
        raw = _step.gradient_stats(mean_sq, piece_sq, pieces, BATCH_SIZE)
        gns.lr_gain("adascale", BATCH_SIZE, BATCH_SIZE, gns.smoothed(averages, raw))

    def split() -> None:
        norms = _step.PieceNorms(lambda: _step.gradient_tensors(params), BATCH_SIZE)
        gradient(BATCH_SIZE // 2, norms)
        finish(*norms.result(), _step.gradient_tensors(params))

    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def rank_of_two() -> None:
        norms = _step.PieceNorms(lambda: [flat], BATCH_SIZE)
        norms(BATCH_SIZE // 2, last=True)
        piece_sq, pieces = norms.result()
        finish(2 * piece_sq, 2 * pieces, [flat])  # the other rank's piece, as if alike

    whole = _best_seconds(lambda: gradient(None))
    return {
        "lone_rank": (_best_seconds(split) - whole) / _step.SPLIT_EVERY,
        "rank_of_two": _best_seconds(rank_of_two),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    plan = QUICK if args.quick else FULL
    data = {size: make_data(plan[size][0] * BATCH_SIZE, seed=1) for size in plan}
    torch.set_num_threads(1)  # as the Dask workers compute (OMP_NUM_THREADS=1)

    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"distributed.client.scheduler-info-interval": "1h"})
    warnings.filterwarnings("ignore", message="Sending large graph")
    cluster = LocalCluster(
        n_workers=1,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    times: dict[str, dict[bool, list[float]]] = {}
    try:
        for rep in range(repeats):
            for backend, workers in ENGINES:
                if backend != "local":
                    scale_cluster(cluster, client, workers)
                for size, (_, epochs) in plan.items():
                    name = f"{backend}_{workers}w_{size}"
                    # Interleaved, the order alternating between repeats.
                    for stats in (False, True) if rep % 2 == 0 else (True, False):
                        seconds = run(
                            SIZES[size], *data[size], epochs, backend, workers, client, stats
                        )
                        times.setdefault(name, {False: [], True: []})[stats].append(seconds)
                    off, on = times[name][False][-1], times[name][True][-1]
                    print(
                        f"{name:<26} off {off * 1e3:8.2f} ms  on {on * 1e3:8.2f} ms  "
                        f"cost {100 * (on / off - 1):+6.1f}%",
                        flush=True,
                    )
    finally:
        client.close()
        cluster.close()
    cost = {
        name: statistics.median(on / off - 1 for off, on in zip(t[False], t[True]))
        for name, t in times.items()
    }
    work = {size: statistics_work(SIZES[size], *data[size]) for size in plan}
    work_ms = {f"{kind}_{size}": 1e3 * w[kind] for size, w in work.items() for kind in w}
    # As a share of the fits' update with the statistics off, on the engine it stands for.
    off_update = {
        "lone_rank": "decentralized_1w",
        "rank_of_two": "decentralized_2w",
    }
    work_share = {
        f"{kind}_{size}": w[kind] / statistics.median(times[f"{off_update[kind]}_{size}"][False])
        for size, w in work.items()
        for kind in w
    }
    for name, share in work_share.items():
        print(f"statistics' own work, {name:<20} {work_ms[name]:7.3f} ms  {100 * share:5.1f}%")
    result = {
        "command": " ".join(
            ["python", "benchmarks/gns.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeats": repeats,
        "ms_per_update": {
            name: {"off": 1e3 * statistics.median(t[False]), "on": 1e3 * statistics.median(t[True])}
            for name, t in times.items()
        },
        "stats_cost": cost,
        "target": TARGET,
        "meets_target": {name: c < TARGET for name, c in cost.items()},
        "statistics_work_ms": work_ms,
        "statistics_work_share": work_share,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
