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
import warnings
from pathlib import Path

import torch
from overhead import BATCH_SIZE, LR, MLP, SIZES, make_data, scale_cluster, steady

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
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
