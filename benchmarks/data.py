"""What reading a map-style Dataset costs per model update, and what it holds in memory.

Speed (the default): the MLP of ``overhead.py`` (its "small" size) on
generated data, global batch 256, trained from the same data twice in the
same run: as arrays (gathered from memory) and as a transform-free
``torch.utils.data.Dataset`` (read with ``dataset[i]`` per example, through
the loader settings the README recommends: a loader process per rank,
``iterator_train__num_workers=1``, where the machine has a core to spare
beside each rank, else ``0``, each rank reading its slice of every update
itself; ``--num-workers N`` sets N for every engine),
with ``random_state`` (the reads draw nothing, so nothing is seeded) and
without (``dataset_unseeded``). Engines: ``local``,
``decentralized`` on 1 and 2 Dask workers. Figures: steady-state ms per
model update (the mean of ``history_`` update durations over every epoch but
the first, less each epoch's first update, as in ``overhead.py``), the
median over ``--repeats`` interleaved repeats, and per engine the ratio
dataset / arrays (target: at most 1.15); beside it, the whole fit's
seconds (``fit`` called to returned, loader processes' start included) and
their ratio.

Memory (``--memory``): a ``.npy`` array of ``--memory-gb`` GB (1.2 by
default) written to a temporary directory, trained on for one epoch as an
``adadamp.data.NpyDataset`` by the decentralized engine on 2 Dask workers;
the client's and each worker's USS (private memory, psutil
``memory_full_info().uss``) is sampled through the fit, and its peak growth
over the value before the fit is reported (target: under 0.3 GB each).

Run from the repository root::

    python benchmarks/data.py --quick            # smoke run of the speed mode
    python benchmarks/data.py                    # speed, full
    python benchmarks/data.py --memory --quick   # smoke run of the memory mode (20 MB)
    python benchmarks/data.py --memory           # memory, 1.2 GB on disk

It prints the figures and writes ``benchmarks/results/data.json`` (speed) or
``benchmarks/results/data_memory.json`` (memory); ``--output`` to change.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402
    BATCH_SIZE,
    LR,
    MLP,
    SIZES,
    make_data,
    scale_cluster,
    source_version,
    steady,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.15
TARGET_USS_GB = 0.3


def recommended_loader(ranks: int) -> dict:
    """The README's loader settings for a Dataset (see "Loader settings") for ``ranks`` ranks."""
    spare_core = (os.cpu_count() or 1) >= 2 * ranks
    return {"iterator_train__num_workers": 1 if spare_core else 0}


ENGINES = [("local", None), ("decentralized", 1), ("decentralized", 2)]
MEMORY_FEATURES = 3 * 32 * 32  # a CIFAR-sized image per row


class ArrayDataset(Dataset):
    """Arrays behind ``dataset[i]``: what a Dataset costs, with no transform to pay for."""

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.y = torch.from_numpy(X), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


class Linear(torch.nn.Module):
    """The memory mode's model: the data, not the model, is what is measured."""

    def __init__(self, n_features: int = MEMORY_FEATURES, n_classes: int = 10):
        super().__init__()
        self.linear = torch.nn.Linear(n_features, n_classes)

    def forward(self, x):
        return self.linear(x)


def _estimator(backend: str, workers: int | None, client, epochs: int, **kwargs):
    from adadamp import DaskClassifier

    extra = {} if backend == "local" else {"client": client, "min_workers": workers}
    if workers:
        extra["max_workers"] = workers
    params = dict(
        module=MLP,
        optimizer=torch.optim.SGD,
        lr=LR,
        batch_size=BATCH_SIZE,
        max_epochs=epochs,
        train_split=None,
        verbose=0,
        backend=backend,
        random_state=0,
    )
    params.update(extra)
    params.update(kwargs)
    return DaskClassifier(**params)


def run_speed(args) -> dict:
    from distributed import Client, LocalCluster

    n, epochs, repeats = (2048, 3, 1) if args.quick else (8192, 4, args.repeats)
    X, y = make_data(n)
    loaders = {
        name: recommended_loader(workers or 1)
        if args.num_workers is None
        else {"iterator_train__num_workers": args.num_workers}
        for name, workers in ((b if w is None else f"{b}_{w}w", w) for b, w in ENGINES)
    }
    import dask

    # Dask workers are daemonic by default, and a daemonic process may not
    # start loader processes: the README's setting for a Dataset on Dask.
    dask.config.set({"distributed.worker.daemon": False})
    cluster = LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster, set_as_default=False)
    torch.set_num_threads(1)  # as a Dask worker computes (Dask sets OMP_NUM_THREADS=1)
    runs: dict[str, list[float]] = {}
    fits: dict[str, list[float]] = {}
    try:
        for _ in range(repeats):
            for backend, workers in ENGINES:
                if workers:
                    scale_cluster(cluster, client, workers)
                name = backend if workers is None else f"{backend}_{workers}w"
                loader = loaders[name]
                # A first fit, not counted, pays what a process does once (imports,
                # a worker's first model), which no later fit pays again: without
                # it the whole-fit figure of whichever kind runs first after the
                # cluster rescaled carries a new worker's start.
                _estimator(backend, workers, client, 1, module__hidden=SIZES["small"]).fit(X, y)
                for kind, data, extra in (
                    ("arrays", (X, y), {}),
                    ("dataset", (ArrayDataset(X, y),), loader),
                    # Without random_state the reads are not seeded (what seeding costs).
                    ("dataset_unseeded", (ArrayDataset(X, y),), {**loader, "random_state": None}),
                ):
                    est = _estimator(
                        backend, workers, client, epochs, module__hidden=SIZES["small"], **extra
                    )
                    began = time.perf_counter()
                    est.fit(*data)
                    fits.setdefault(f"{name}_{kind}", []).append(time.perf_counter() - began)
                    per_epoch = [[u["duration"] for u in e] for e in est.history_[:, "batches"]]
                    runs.setdefault(f"{name}_{kind}", []).append(
                        1000 * statistics.fmean(steady(per_epoch))
                    )
    finally:
        client.close()
        cluster.close()
    ms = {key: round(statistics.median(v), 3) for key, v in runs.items()}
    fit_s = {key: round(statistics.median(v), 3) for key, v in fits.items()}
    ratios, unseeded, fit_ratios = {}, {}, {}
    for backend, workers in ENGINES:
        name = backend if workers is None else f"{backend}_{workers}w"
        ratios[name] = round(ms[f"{name}_dataset"] / ms[f"{name}_arrays"], 3)
        unseeded[name] = round(ms[f"{name}_dataset_unseeded"] / ms[f"{name}_arrays"], 3)
        fit_ratios[name] = round(fit_s[f"{name}_dataset"] / fit_s[f"{name}_arrays"], 3)
    result = {
        "mode": "speed",
        "settings": {
            "n_examples": n,
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "hidden": list(SIZES["small"]),
            "repeats": repeats,
            "loader": loaders,
            "dask_worker_daemon": False,
            "random_state": 0,
            "not_counted": "the first epoch, and the first update of every other epoch",
        },
        "ms_per_update": ms,
        "runs_ms_per_update": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "ratio_dataset_vs_arrays": ratios,
        "ratio_unseeded_dataset_vs_arrays": unseeded,
        "fit_s": fit_s,
        "ratio_fit_dataset_vs_arrays": fit_ratios,
        "targets": {
            name: {"at_most": TARGET_RATIO, "measured": r, "met": r <= TARGET_RATIO}
            for name, r in ratios.items()
        },
    }
    print(f"loader settings: {loaders}, distributed.worker.daemon=False")
    print(
        f"{'engine':<18} {'arrays ms':>10} {'dataset ms':>11} {'ratio':>7} {'unseeded':>9}"
        f" {'fit ratio':>10}"
    )
    for name, r in ratios.items():
        verdict = "met" if r <= TARGET_RATIO else "MISSED"
        print(
            f"{name:<18} {ms[f'{name}_arrays']:>10.3f} {ms[f'{name}_dataset']:>11.3f} "
            f"{r:>7.3f} {unseeded[name]:>9.3f} {fit_ratios[name]:>10.3f}"
            f"   target <= {TARGET_RATIO}: {verdict}"
        )
    return result


def write_npy(path: Path, rows: int, features: int, seed: int = 0) -> None:
    """Random float32 rows written in chunks (never the whole array in memory)."""
    rng = np.random.default_rng(seed)
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    step = max(1, (64 << 20) // (4 * features))
    for start in range(0, rows, step):
        X[start : start + step] = rng.standard_normal((min(step, rows - start), features))
        X.flush()
    del X


def _uss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_full_info().uss


class PeakUss:
    """Samples the USS of some processes every ``interval`` seconds, in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        self.pids, self.interval = pids, interval
        self.before = {name: _uss(pid) for name, pid in pids.items()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], _uss(pid))

    def __enter__(self) -> PeakUss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def growth_gb(self) -> dict[str, float]:
        return {name: round((self.peak[name] - self.before[name]) / 1e9, 4) for name in self.pids}


def run_memory(args) -> dict:
    from distributed import Client, LocalCluster

    from adadamp.data import NpyDataset

    gb = 0.02 if args.quick else args.memory_gb
    rows = int(gb * 1e9 / (4 * MEMORY_FEATURES))
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        x_path, y_path = Path(tmp) / "X.npy", Path(tmp) / "y.npy"
        write_npy(x_path, rows, MEMORY_FEATURES)
        np.save(y_path, np.random.default_rng(1).integers(0, 10, rows))
        dataset = NpyDataset(x_path, y_path)
        cluster = LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            memory_limit=args.worker_memory,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster, set_as_default=False)
        try:
            scale_cluster(cluster, client, 2)
            # The workers' own start (importing torch and the engine, a few
            # hundred MB each) is the cluster's, not the data's: done first.
            client.run(importlib.import_module, "adadamp.engines.decentralized")
            pids = {"client": os.getpid()}
            for i, pid in enumerate(sorted(client.run(os.getpid).values())):
                pids[f"worker_{i}"] = pid
            est = _estimator(
                "decentralized",
                2,
                client,
                1,
                module=Linear,
                module__n_features=MEMORY_FEATURES,
                grads_per_worker=BATCH_SIZE // 2,
            )
            began = time.perf_counter()
            with PeakUss(pids) as peak:
                est.fit(dataset)
            seconds = time.perf_counter() - began
        finally:
            client.close()
            cluster.close()
    growth = peak.growth_gb()
    result = {
        "mode": "memory",
        "settings": {
            "array_gb": round(rows * MEMORY_FEATURES * 4 / 1e9, 3),
            "rows": rows,
            "features": MEMORY_FEATURES,
            "dataset": "adadamp.data.NpyDataset",
            "engine": "decentralized, 2 workers",
            "worker_memory_limit": args.worker_memory,
            "epochs": 1,
            "batch_size": BATCH_SIZE,
        },
        "fit_seconds": round(seconds, 1),
        "uss_growth_gb": growth,
        "targets": {
            name: {"under": TARGET_USS_GB, "measured": g, "met": g < TARGET_USS_GB}
            for name, g in growth.items()
        },
    }
    print(f"{result['settings']['array_gb']} GB on disk (NpyDataset), decentralized on 2 workers")
    for name, g in growth.items():
        verdict = "met" if g < TARGET_USS_GB else "MISSED"
        print(f"  {name:<10} USS grew {g:7.3f} GB   target < {TARGET_USS_GB}: {verdict}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (speed)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="iterator_train__num_workers for every engine's Dataset runs "
        "(default: the README's recommendation per engine)",
    )
    parser.add_argument("--memory", action="store_true", help="the memory mode")
    parser.add_argument("--memory-gb", type=float, default=1.2, help="array size (memory mode)")
    parser.add_argument("--worker-memory", default="4GiB", help="each worker's memory limit")
    parser.add_argument("--tmpdir", default=None, help="where the memory mode writes its array")
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = run_memory(args) if args.memory else run_speed(args)
    result.update(
        command=" ".join(["python", "benchmarks/data.py", *(argv or sys.argv[1:])]),
        adadamp_commit=source_version(),
        machine={
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_1_5_15min_before": [round(v, 2) for v in load_before],
            "load_average_1_5_15min_after": [round(v, 2) for v in os.getloadavg()],
        },
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    output = args.output or RESULTS / ("data_memory.json" if args.memory else "data.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output} in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
