"""Check the simulator against this machine with emulated compute.

The decentralized engine trains a module whose parameters have a real size
but whose forward *sleeps* for ``len(x) * seconds_per_example`` instead of
computing, and returns a cheap differentiable function of every parameter.
So each worker sleeps for its share of the batch, every parameter gets a
gradient of its real size, and the real gloo all-reduce of real-size tensors
runs. With ``B = grads_per_worker * P`` (weak scaling) the sleep per worker is
the same at every ``P``; :func:`adadamp.simulate.update_time` predicts the
update time from that sleep, the parameter count and a :class:`Network`
measured here (a gloo ping-pong between two workers).

Per worker count ``P`` the script:

1. scales one ``LocalCluster`` (worker processes, one thread each) to ``P``;
2. times a bare gloo all-reduce of the engine's flat buffer on those ``P``
   workers (what the ring formula describes, without the rest of an update);
3. fits a ``DaskRegressor`` (``backend="decentralized"``,
   ``min_workers = max_workers = P``, constant batch size) and reads each
   update's ``duration`` from ``history_``, skipping the first updates of every
   epoch (each epoch is one segment with a fresh process group);
4. reads what the workers logged in the forward pass: the actual sleep, and
   the CPU time each worker process used per update.

With ``--schedule`` it checks a whole run instead of one update time: a
``GeoDamp`` schedule (batch 128, doubled every ``--delay`` epochs up to
``128 * --schedule-workers``) trains on a cluster that starts with one worker
and that the engine grows itself, asking for workers ahead. The fit's
wall-clock, from ``fit`` to its return (the cluster's start excluded, every
rescale, epoch boundary and process group included; the cluster's own start
and its first worker's imports excluded), is set against
:func:`adadamp.simulate.simulate_run` of the same planned schedule under the
network measured afterwards.

Run from the repository root::

    python benchmarks/emulated.py --quick      # P = 1, 2, 4, one model size (about a minute)
    python benchmarks/emulated.py              # P = 1 ... 16, two model sizes (5 minutes)
    python benchmarks/emulated.py --schedule   # a GeoDamp run grown to 4 workers (about 40 s)

and it writes ``benchmarks/results/emulated.json`` (``emulated_schedule.json``
with ``--schedule``; ``--output`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from adadamp import DaskRegressor
from adadamp.dampers import GeoDamp
from adadamp.engines._loop import EXTRA_SLOTS
from adadamp.simulate import (
    T4_SECONDS_PER_EXAMPLE,
    WRN_16_4_PARAMS,
    Decentralized,
    Network,
    PlannedRun,
    simulate_run,
    update_time,
)

RESULTS = Path(__file__).resolve().parent / "results" / "emulated.json"
SCHEDULE_RESULTS = RESULTS.with_name("emulated_schedule.json")
# Where a worker keeps its forward-pass log (an attribute of the Dask worker object).
LOG_ATTR = "_adadamp_emulated_log"
GROUP_TIMEOUT = datetime.timedelta(seconds=120)


# --------------------------------------------------------------------------- the module
class EmulatedModule(nn.Module):
    """Parameters of a real size; a forward that sleeps instead of computing.

    Parameters
    ----------
    n_params : int
        Total parameters, split over ``n_tensors`` float32 tensors.
    seconds_per_example : float
        The forward sleeps ``len(x) * seconds_per_example`` seconds.
    n_tensors : int
        How many parameter tensors (only the per-tensor overhead of backward
        and the optimizer step depends on it).
    """

    def __init__(
        self,
        n_params: int = WRN_16_4_PARAMS,
        seconds_per_example: float = T4_SECONDS_PER_EXAMPLE,
        n_tensors: int = 16,
    ):
        super().__init__()
        sizes = np.full(n_tensors, n_params // n_tensors)
        sizes[: n_params % n_tensors] += 1
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(int(s))) for s in sizes)
        self.seconds_per_example = seconds_per_example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        began, cpu = time.perf_counter(), time.process_time()
        time.sleep(len(x) * self.seconds_per_example)
        slept = time.perf_counter() - began
        _log_forward(began, cpu, slept, len(x))
        # d(out)/d(p) is a constant for every element of every parameter: a
        # gradient of the real size at the cost of a fill.
        total = torch.stack([w.sum() for w in self.weights]).sum()
        return x[:, :1] * 0 + 1e-3 * total


def _log_forward(began: float, cpu: float, slept: float, n: int) -> None:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return  # on the client (the estimator's shape check): nothing to log
    log = getattr(worker, LOG_ATTR, None)
    if log is None:
        log = []
        setattr(worker, LOG_ATTR, log)
    log.append((began, cpu, slept, n))


def _take_log(dask_worker) -> list:
    log = getattr(dask_worker, LOG_ATTR, None) or []
    setattr(dask_worker, LOG_ATTR, [])
    return log


# --------------------------------------------------------------------------- gloo probes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(port: int, rank: int, world: int):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=GROUP_TIMEOUT)
    return dist.ProcessGroupGloo(store, rank, world, GROUP_TIMEOUT)


def _ping_task(port: int, rank: int, sizes: list[int], reps: int) -> dict:
    """Round trips of one float32 tensor of each size between ranks 0 and 1."""
    torch.set_num_threads(1)
    group = _group(port, rank, 2)
    out = {}
    for n in sizes:
        t = torch.zeros(n)
        times = []
        for i in range(reps + 1):
            began = time.perf_counter()
            if rank == 0:
                group.send([t], 1, 0).wait()
                group.recv([t], 1, 0).wait()
            else:
                group.recv([t], 0, 0).wait()
                group.send([t], 0, 0).wait()
            if i:  # the first round trip of a size is a warm-up
                times.append(time.perf_counter() - began)
        out[n] = times
    return out


def _allreduce_task(port: int, rank: int, world: int, n_floats: int, reps: int) -> list[float]:
    """Seconds of each all-reduce of ``n_floats`` float32, after a barrier."""
    torch.set_num_threads(1)
    group = _group(port, rank, world)
    buf, token = torch.zeros(n_floats), torch.zeros(1)
    times = []
    for i in range(reps + 1):
        group.allreduce([token]).wait()  # start together
        began = time.perf_counter()
        group.allreduce([buf]).wait()
        if i:
            times.append(time.perf_counter() - began)
    return times


def _pinned(client, workers, fn, *args_per_rank):
    futures = [
        client.submit(fn, *args, workers=[w], allow_other_workers=False, pure=False)
        for w, args in zip(workers, args_per_rank)
    ]
    return client.gather(futures)


def measure_network(client, n_bytes: int, reps: int) -> dict:
    """Latency and bandwidth between two worker processes, by gloo ping-pong.

    latency = half the fastest round trip of a 4-byte message; bandwidth =
    ``8 * n_bytes`` over (half the fastest round trip of an ``n_bytes``
    message, minus the latency). Measured, not fitted. The fastest of ``reps``
    round trips describes the link itself: on a shared machine the median also
    holds waits for a core, which are what this benchmark sets out to expose,
    not part of the network (the medians are recorded too).
    """
    from adadamp.scaling import available_workers

    workers = available_workers(client)[:2]
    port = _free_port()
    n_floats = max(1, n_bytes // 4)
    res = _pinned(client, workers, _ping_task, *[(port, r, [1, n_floats], reps) for r in range(2)])[
        0
    ]
    small, large = min(res[1]) / 2, min(res[n_floats]) / 2
    return {
        "method": "gloo send/recv ping-pong between 2 worker processes, fastest of "
        f"{reps} round trips; latency = RTT(4 B)/2, "
        "bandwidth = 8 M / (RTT(M)/2 - latency)",
        "message_bytes": n_floats * 4,
        "rtt_small_min_s": 2 * small,
        "rtt_large_min_s": 2 * large,
        "rtt_small_median_s": statistics.median(res[1]),
        "rtt_large_median_s": statistics.median(res[n_floats]),
        "latency_s": small,
        "bandwidth_bps": 8 * n_floats * 4 / max(large - small, 1e-9),
    }


def measure_allreduce(client, workers, n_floats: int, reps: int) -> dict:
    if len(workers) < 2:
        return {"median_s": 0.0, "reps": 0}
    port = _free_port()
    world = len(workers)
    per_rank = _pinned(
        client, workers, _allreduce_task, *[(port, r, world, n_floats, reps) for r in range(world)]
    )
    slowest = np.max(np.array(per_rank), axis=0)  # a rep lasts until its last rank is done
    return {"median_s": float(np.median(slowest)), "reps": reps}


def measure_local_work(n_params: int, threads: int, reps: int = 20) -> dict:
    """Wall and CPU time of one update's work besides the sleep and the all-reduce.

    The same steps as a rank of the decentralized engine: zero the flat
    gradient buffer, forward and backward (no sleep), divide, optimizer step;
    in this process, with ``threads`` torch threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        module = EmulatedModule(n_params, seconds_per_example=0.0)
        params = list(module.parameters())
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes) + 2)
        for p, view in zip(params, torch.split(flat[:-2], sizes)):
            p.grad = view.view_as(p)
        optimizer = torch.optim.SGD(params, lr=1e-3)
        criterion = nn.MSELoss()
        X, y = torch.ones(128, 1), torch.zeros(128, 1)
        walls, cpus = [], []
        for i in range(reps + 2):
            began, cpu = time.perf_counter(), time.process_time()
            flat.zero_()
            (criterion(module(X), y) * len(X)).backward()
            for p in params:
                p.grad.div_(len(X))
            optimizer.step()
            if i >= 2:
                walls.append(time.perf_counter() - began)
                cpus.append(time.process_time() - cpu)
        return {
            "threads": threads,
            "wall_median_s": statistics.median(walls),
            "wall_max_s": max(walls),
            "cpu_median_s": statistics.median(cpus),
        }
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- machine
def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    import distributed

    cores = _cores()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": cores,
        "memory_bytes": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distributed": distributed.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- one P
def forward_stats(logs: dict, updates_per_epoch: int, warmup: int) -> dict:
    """Per-rank CPU use and sleep accuracy over the measured (post-warm-up) updates.

    A rank calls forward once per update, so from one forward to the next is
    one update period on that rank, and the process CPU time spent in between
    (all threads: the training task, gloo, Dask's event loop) is its CPU per update.
    """
    cpu_per_update, rank_cores, slept = [], [], []
    for log in logs.values():
        log = sorted(log)
        rates = []
        for start in range(0, len(log), updates_per_epoch):
            seg = log[start : start + updates_per_epoch][warmup:]
            if len(seg) < 2:
                continue
            d_wall, d_cpu = seg[-1][0] - seg[0][0], seg[-1][1] - seg[0][1]
            cpu_per_update.append(d_cpu / (len(seg) - 1))
            rates.append(d_cpu / d_wall)
            slept += [s for (_, _, s, _) in seg]
        if rates:
            rank_cores.append(float(np.mean(rates)))
    return {
        "cpu_s_per_update_per_rank": float(np.median(cpu_per_update)) if cpu_per_update else None,
        "rank_cores_busy": float(np.sum(rank_cores)),
        "sleep_actual_s": float(np.median(slept)) if slept else None,
    }


def scale(client, cluster, p: int) -> list[str]:
    from adadamp.scaling import available_workers

    cluster.scale(p)
    client.wait_for_workers(p, timeout=300)
    while len(available_workers(client)) != p:
        time.sleep(0.05)
    return available_workers(client)


def emulated_regressor(client, n_params: int, args, **params) -> DaskRegressor:
    """The decentralized regressor over an :class:`EmulatedModule` that both modes fit."""
    return DaskRegressor(
        EmulatedModule,
        module__n_params=n_params,
        module__seconds_per_example=args.seconds_per_example,
        optimizer=torch.optim.SGD,
        lr=1e-3,
        grads_per_worker=args.grads_per_worker,
        backend="decentralized",
        client=client,
        random_state=0,
        verbose=0,
        **params,
    )


def run_one(client, workers: list[str], n_params: int, args) -> dict:
    """Bare all-reduce, then the fit, on the ``P = len(workers)`` workers of the cluster."""
    p = len(workers)
    t0 = time.perf_counter()
    n_flat = n_params + EXTRA_SLOTS  # the engine's flat buffer: gradients and its extra slots
    bare = measure_allreduce(client, workers, n_flat, args.allreduce_reps)
    t1 = time.perf_counter()

    batch = args.grads_per_worker * p
    n = batch * args.updates_per_epoch
    net = emulated_regressor(
        client,
        n_params,
        args,
        batch_size=batch,
        max_epochs=args.epochs,
        min_workers=p,
        max_workers=p,
    )
    client.run(_take_log)
    # What the machine does without this fit (other work, idle Dask processes).
    busy0, total0 = _cpu_times()
    time.sleep(1.0)
    busy1, total1 = _cpu_times()
    cores = _cores()
    background = (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else None
    busy0, total0 = _cpu_times()
    began = time.perf_counter()
    net.fit(torch.ones(n, 1), torch.zeros(n, 1))
    fit_s = time.perf_counter() - began
    busy1, total1 = _cpu_times()
    logs = client.run(_take_log)

    durations, workers_seen = [], set()
    for epoch in net.history_:
        batches = epoch["batches"]
        workers_seen.update(b["workers"] for b in batches)
        durations += [b["duration"] for b in batches[args.warmup :]]
    if workers_seen != {p}:
        raise RuntimeError(f"P={p}: updates ran on {sorted(workers_seen)} workers")
    stats = forward_stats(logs, args.updates_per_epoch, args.warmup)
    machine_busy = (busy1 - busy0) / (total1 - total0) * cores if total1 > total0 else None
    return {
        "n_params": n_params,
        "workers": p,
        "batch_size": batch,
        "measured_median_s": float(np.median(durations)),
        "measured_mean_s": float(np.mean(durations)),
        "measured_p10_s": float(np.percentile(durations, 10)),
        "measured_p90_s": float(np.percentile(durations, 90)),
        "measured_updates": len(durations),
        "bare_allreduce_median_s": bare["median_s"],
        "cpu_s_per_update_per_rank": stats["cpu_s_per_update_per_rank"],
        "rank_cores_busy": stats["rank_cores_busy"],
        "machine_cores_busy": machine_busy,
        "background_cores_busy_before_fit": background,
        "load_average_1m": os.getloadavg()[0],
        "sleep_actual_s": stats["sleep_actual_s"],
        # If the ranks' CPU work could not overlap at all and had every core:
        "cpu_floor_s": p * stats["cpu_s_per_update_per_rank"] / cores,
        "seconds": {"bare_allreduce": t1 - t0, "fit": fit_s},
    }


def add_simulation(row: dict, network: Network, args) -> None:
    sim = update_time(
        row["batch_size"],
        row["workers"],
        network=network,
        architecture=Decentralized(),
        seconds_per_example=args.seconds_per_example,
        n_params=row["n_params"],
    )
    row.update(
        compute_s=sim.compute_s,
        simulated_s=sim.total_s,
        simulated_communication_s=sim.communication_s,
        simulated_vs_measured=sim.total_s / row["measured_median_s"],
    )


# --------------------------------------------------------------------------- whole schedule
def schedule_damper(args) -> GeoDamp:
    """Batch ``grads_per_worker``, doubled every ``delay`` epochs until it needs the last worker."""
    return GeoDamp(initial=args.grads_per_worker, delay=args.delay, factor=2)


def schedule_epochs(args) -> int:
    # One doubling per step from 1 worker to schedule_workers, each held for ``delay`` epochs.
    return args.delay * (int(np.log2(args.schedule_workers)) + 1)


def run_schedule(client, args) -> dict:
    """One fit of the GeoDamp schedule on a cluster the engine grows from one worker."""
    n_params = args.n_params[0]
    n = args.grads_per_worker * args.updates_per_epoch
    net = emulated_regressor(
        client,
        n_params,
        args,
        batch_size=schedule_damper(args),
        max_epochs=schedule_epochs(args),
        max_workers=args.schedule_workers,
    )
    began = time.perf_counter()
    net.fit(torch.ones(n, 1), torch.zeros(n, 1))
    fit_s = time.perf_counter() - began
    client.run(_take_log)
    updates = [b for epoch in net.history_ for b in epoch["batches"]]
    rescales = [r for epoch in net.history_ for r in epoch["rescales"]]
    return {
        "n_params": n_params,
        "n_examples": n,
        "epochs": schedule_epochs(args),
        "measured_fit_s": fit_s,
        "sum_of_update_durations_s": float(sum(b["duration"] for b in updates)),
        "updates": len(updates),
        "workers_per_update": [b["workers"] for b in updates],
        "batch_size_per_update": [b["train_batch_size"] for b in updates],
        "rescales": rescales,
        "load_average_1m": os.getloadavg()[0],
    }


def simulate_schedule(row: dict, network: Network, args) -> dict:
    """``simulate_run`` of the planned schedule, and of the worker counts the fit ran on.

    The two differ where a worker was not ready when the schedule first
    needed it (training went on on fewer meanwhile).
    """
    common = dict(
        network=network,
        architecture=Decentralized(),
        seconds_per_example=args.seconds_per_example,
        n_params=row["n_params"],
        grads_per_worker=args.grads_per_worker,
        max_workers=args.schedule_workers,
    )
    planned = simulate_run(
        PlannedRun(schedule_damper(args), row["n_examples"], row["epochs"]), **common
    )
    as_run = simulate_run(row["batch_size_per_update"], workers=row["workers_per_update"], **common)
    return {
        "simulated_s": planned.total_seconds,
        "simulated_vs_measured": planned.total_seconds / row["measured_fit_s"],
        "simulated_as_run_s": as_run.total_seconds,
        "simulated_as_run_vs_measured": as_run.total_seconds / row["measured_fit_s"],
        "updates_off_plan": int(np.sum(planned.workers != np.array(row["workers_per_update"]))),
    }


def one_worker_cluster(args):
    """A LocalCluster of one worker process (one thread), and its client: both modes grow it."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=1,
        processes=True,
        threads_per_worker=1,
        memory_limit=args.memory_limit,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    )
    return cluster, Client(cluster)


def main_schedule(args, argv) -> dict:
    started = time.perf_counter()
    machine = machine_info()
    cluster, client = one_worker_cluster(args)
    try:
        # The cluster's start, not the schedule's (as adadamp compare does): its
        # worker imports the engine, and this process torch.optim (whose first
        # optimizer imports torch._dynamo, about a second).
        client.run(importlib.import_module, "adadamp.engines.decentralized")
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        row = run_schedule(client, args)
        # Measured after the fit, when the cluster has grown to two workers or
        # more, once no worker still runs a task of the fit (a warm-up that a
        # short fit did not wait for).
        while any(client.processing().values()):
            time.sleep(0.1)
        net_info = measure_network(client, args.n_params[0] * 4, reps=args.ping_reps)
    finally:
        client.close()
        cluster.close()
    network = Network(net_info["bandwidth_bps"], net_info["latency_s"])
    row.update(simulate_schedule(row, network, args))
    stalls = [r["seconds"] for r in row["rescales"]]
    result = {
        "command": " ".join(
            ["python benchmarks/emulated.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine,
        "settings": {
            "damper": repr(schedule_damper(args)),
            "n_params": args.n_params[0],
            "seconds_per_example": args.seconds_per_example,
            "grads_per_worker": args.grads_per_worker,
            "schedule_workers": args.schedule_workers,
            "memory_limit": args.memory_limit,
        },
        "network": net_info,
        "schedule": row,
        "targets": {"simulated_vs_measured_within": 0.2},
        "wall_seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"loopback (measured): {network.describe()}")
    print(
        f"GeoDamp to {args.schedule_workers} workers, {row['updates']} updates, "
        f"{row['n_params']:,} params: measured fit {row['measured_fit_s']:.2f} s "
        f"(updates alone {row['sum_of_update_durations_s']:.2f} s), "
        f"simulated {row['simulated_s']:.2f} s, simulated/measured "
        f"{row['simulated_vs_measured']:.2f} (on the workers as run: "
        f"{row['simulated_as_run_vs_measured']:.2f}; {row['updates_off_plan']} updates on "
        "fewer workers than planned); rescales "
        + ", ".join(f"{r['from']}->{r['to']} stalled {r['seconds']:.2f} s" for r in row["rescales"])
        + f" (total {sum(stalls):.2f} s)"
    )
    print(f"wrote {args.output} ({result['wall_seconds']:.0f} s)")
    return result


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="P = 1, 2, 4, the Wide-ResNet size only, fewer updates (about 1 min)",
    )
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1 2 4 8 16)")
    parser.add_argument(
        "--n-params",
        type=int,
        nargs="+",
        help="parameters of the emulated model, one run per value (default: "
        f"{WRN_16_4_PARAMS} as a Wide-ResNet-16-4, and a tenth of it; "
        "quick: the first only); the first is the headline",
    )
    parser.add_argument(
        "--seconds-per-example",
        type=float,
        default=T4_SECONDS_PER_EXAMPLE,
        help="sleep per example (default: the paper's T4, 78.32 ms / 128)",
    )
    parser.add_argument("--grads-per-worker", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per P")
    parser.add_argument(
        "--updates-per-epoch", type=int, help="updates per epoch (default 30, quick 10)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="updates skipped at the start of every epoch (a new process group)",
    )
    parser.add_argument("--allreduce-reps", type=int, default=5)
    parser.add_argument("--ping-reps", type=int, default=30)
    parser.add_argument("--memory-limit", default="1GiB", help="per Dask worker")
    parser.add_argument(
        "--schedule",
        action="store_true",
        help="a whole GeoDamp run grown from 1 worker, against simulate_run (see above)",
    )
    parser.add_argument(
        "--schedule-workers",
        type=int,
        default=4,
        help="workers the schedule grows to (a power of 2)",
    )
    parser.add_argument("--delay", type=int, default=2, help="epochs between doublings")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    args.output = args.output or (SCHEDULE_RESULTS if args.schedule else RESULTS)
    args.workers = args.workers or ([1, 2, 4] if args.quick else [1, 2, 4, 8, 16])
    # The schedule run's epochs last several times a worker's start on this
    # machine, as real epochs do, so that asking ahead has room to work.
    args.updates_per_epoch = args.updates_per_epoch or (
        100 if args.schedule else 10 if args.quick else 30
    )
    args.n_params = args.n_params or (
        # The schedule run uses the smaller model: its all-reduce over 4 ranks on
        # 2 cores stays within the network formula (see docs/simulation.md).
        [WRN_16_4_PARAMS // 10]
        if args.schedule
        else [WRN_16_4_PARAMS]
        if args.quick
        else [WRN_16_4_PARAMS, WRN_16_4_PARAMS // 10]
    )
    if args.warmup >= args.updates_per_epoch - 1:
        parser.error("--warmup must leave at least 2 updates per epoch")
    return args


def main(argv=None) -> dict:
    import warnings

    # Each segment task carries the model's state (~n_params * 4 bytes): expected here.
    warnings.filterwarnings("ignore", message="Sending large graph")

    args = parse_args(argv)
    if args.schedule:
        return main_schedule(args, argv)
    started = time.perf_counter()
    machine = machine_info()
    # One cluster, grown: P ascending, so scaling only ever starts workers.
    cluster, client = one_worker_cluster(args)
    net_info, rows = None, []
    try:
        for p in args.workers:
            t0 = time.perf_counter()
            workers = scale(client, cluster, p)
            scale_s = time.perf_counter() - t0
            if net_info is None and p >= 2:
                net_info = measure_network(client, args.n_params[0] * 4, reps=args.ping_reps)
            for n_params in args.n_params:
                row = run_one(client, workers, n_params, args)
                row["seconds"]["scale"] = scale_s
                rows.append(row)
                print(
                    f"n_params={n_params:>9,} P={p:2d} "
                    f"measured {row['measured_median_s'] * 1e3:7.1f} ms  "
                    f"bare all-reduce {row['bare_allreduce_median_s'] * 1e3:6.1f} ms  "
                    f"CPU/update/rank {row['cpu_s_per_update_per_rank'] * 1e3:6.1f} ms  "
                    f"cores busy: ranks {row['rank_cores_busy']:.2f}, machine "
                    f"{row['machine_cores_busy']:.2f}, before the fit "
                    f"{row['background_cores_busy_before_fit']:.2f}  "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
        if net_info is None:
            net_info = measure_network(client, args.n_params[0] * 4, reps=args.ping_reps)
    finally:
        client.close()
        cluster.close()
    network = Network(net_info["bandwidth_bps"], net_info["latency_s"])
    print(f"loopback (measured): {network.describe()}")
    cores = machine["cores"]
    local_work = {
        str(n): [measure_local_work(n, t) for t in sorted({1, cores})] for n in args.n_params
    }
    for row in rows:
        add_simulation(row, network, args)

    ratios = {}
    for i, n_params in enumerate(args.n_params):
        # Keys without a suffix are the headline size's; the others carry "_<n>params".
        suffix = "" if i == 0 else f"_{n_params}params"
        mine = [r for r in rows if r["n_params"] == n_params]
        base = next((r["measured_median_s"] for r in mine if r["workers"] == 1), None)
        for row in mine:
            p = row["workers"]
            row["vs_1w"] = row["measured_median_s"] / base if base else None
            if base and p != 1:
                ratios[f"update_time_{p}w_vs_1w{suffix}"] = row["vs_1w"]
            ratios[f"simulated_vs_measured_{p}w{suffix}"] = row["simulated_vs_measured"]
    result = {
        "command": " ".join(
            ["python benchmarks/emulated.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine,
        "settings": {
            "n_params": args.n_params,
            "seconds_per_example": args.seconds_per_example,
            "grads_per_worker": args.grads_per_worker,
            "epochs": args.epochs,
            "updates_per_epoch": args.updates_per_epoch,
            "warmup_per_epoch": args.warmup,
            "memory_limit": args.memory_limit,
        },
        "network": net_info,
        "local_update_work": local_work,
        "rows": rows,
        "ratios": ratios,
        "targets": {"update_time_16w_vs_1w_at_most": 1.25, "simulated_vs_measured_within": 0.2},
        "wall_seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(rows))
    print(f"wrote {args.output} ({result['wall_seconds']:.0f} s)")
    return result


def _table(rows: list[dict]) -> str:
    lines = [
        "  params   P      B  measured  simulated  sim/meas  P vs 1  bare all-reduce  "
        "CPU/update/rank  P*CPU/cores",
        "                         (ms)       (ms)                              (ms)  "
        "           (ms)         (ms)",
    ]
    for r in rows:
        vs = f"{r['vs_1w']:.2f}" if r.get("vs_1w") else "-"
        lines.append(
            f"{r['n_params']:8d} {r['workers']:3d} {r['batch_size']:6d} "
            f"{r['measured_median_s'] * 1e3:9.1f} {r['simulated_s'] * 1e3:10.1f} "
            f"{r['simulated_vs_measured']:9.2f} {vs:>7} "
            f"{r['bare_allreduce_median_s'] * 1e3:16.1f} "
            f"{r['cpu_s_per_update_per_rank'] * 1e3:16.1f} {r['cpu_floor_s'] * 1e3:12.1f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
