"""Sums through shared memory among processes of one host (adadamp.engines._host_sum)."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adadamp.engines import _host_sum

pytestmark = pytest.mark.skipif(not _host_sum.supported(), reason="x86-64 Linux only")


def _group(store_path: str, rank: int, world: int):
    store = dist.FileStore(store_path, world)
    return dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=30))


def _inputs(rank: int, n: int, dtype) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(rank), dtype=dtype)


def _sum_ranks(rank, world, store_path, out_dir, n, nbytes, dtype_name):
    dtype = getattr(torch, dtype_name)
    group = _group(store_path, rank, world)
    summed = _host_sum.open_host_sum(group, rank, world, nbytes, timeout_s=30)
    assert summed is not None
    results = []
    for step in range(3):  # both parities of the slots, twice
        tensor = _inputs(rank, n, dtype) * (step + 1)
        summed.all_reduce(tensor)
        results.append(tensor)
    summed.close()
    torch.save(results, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.parametrize(
    "world, n, nbytes, dtype",
    [
        (2, 1000, 4004, "float32"),
        (3, 1000, 4000, "float64"),  # slots of 4000 bytes: 500 values, two chunks
        (3, 1001, 256, "float32"),  # 64 values per slot: 16 chunks, the last short
    ],
)
def test_every_rank_gets_the_sum_in_rank_order(tmp_path, world, n, nbytes, dtype):
    before = _mappings()
    mp.spawn(
        _sum_ranks,
        args=(world, str(tmp_path / "store"), str(tmp_path), n, nbytes, dtype),
        nprocs=world,
    )
    got = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    for step in range(3):
        expected = _inputs(0, n, getattr(torch, dtype)) * (step + 1)
        for rank in range(1, world):
            expected = expected + _inputs(rank, n, getattr(torch, dtype)) * (step + 1)
        for rank in range(world):
            assert torch.equal(got[rank][step], expected), (rank, step)
    assert _mappings() == before  # removed once every rank had mapped it


def _mappings() -> set[str]:
    return {name for name in os.listdir(_host_sum.SHM_DIR) if name.startswith("adadamp-")}


def _lose_a_peer(rank, world, store_path, out_dir, how):
    group = _group(store_path, rank, world)
    flag = os.path.join(out_dir, "given_up")
    summed = _host_sum.open_host_sum(
        group, rank, world, 64, timeout_s=30, given_up=lambda: os.path.exists(flag)
    )
    assert summed is not None
    summed.all_reduce(torch.ones(4))  # one sum together first
    if rank == 1:
        if how == "dies":
            os._exit(0)
        if how == "leaves":
            summed.close()
        if how == "given_up":
            open(flag, "w").close()
        time.sleep(30 if how == "given_up" else 0)  # rank 1 never sums again
        return
    began = time.monotonic()
    try:
        summed.all_reduce(torch.ones(4))
        outcome = "summed"
    except _host_sum.PeerLost as error:
        outcome = f"{type(error).__name__}: {error}"
    with open(os.path.join(out_dir, "outcome"), "w") as file:
        file.write(f"{outcome}\n{time.monotonic() - began}")
    os._exit(0)  # without waiting for rank 1 in the group's teardown


@pytest.mark.parametrize(
    "how, says", [("dies", "died"), ("leaves", "left"), ("given_up", "released")]
)
def test_a_rank_waiting_for_a_lost_peer_stops_within_a_second(tmp_path, how, says):
    context = mp.start_processes(
        _lose_a_peer,
        args=(2, str(tmp_path / "store"), str(tmp_path), how),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "outcome").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in context.processes:
        process.kill()
        process.join()
    outcome, seconds = (tmp_path / "outcome").read_text().split("\n")
    assert outcome.startswith("PeerLost") and says in outcome, outcome
    assert float(seconds) < 1.0


def _refused(rank, world, store_path, out_dir):
    if rank == 0:  # rank 0 cannot create a mapping: every rank falls back
        _host_sum.supported = lambda: False
    group = _group(store_path, rank, world)
    summed = _host_sum.open_host_sum(group, rank, world, 64, timeout_s=30)
    with open(os.path.join(out_dir, f"{rank}"), "w") as file:
        file.write(str(summed is None))


def test_no_rank_uses_shared_memory_unless_every_rank_can(tmp_path):
    mp.spawn(_refused, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    assert [(tmp_path / str(rank)).read_text() for rank in range(2)] == ["True", "True"]
