"""Loader processes: batches in order, errors raised where taken, nothing left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from adadamp._loader_processes import LoaderProcesses
from adadamp.examples import DatasetExamples, _SeededItems, collate_pairs


class Rows(Dataset):
    """Example ``i`` is ``(i, pid of the reading process)``; ``bad`` raise, ``fatal`` exit."""

    def __init__(self, n: int = 64, bad: int | None = None, fatal: int | None = None):
        self.n, self.bad, self.fatal = n, bad, fatal

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise KeyError(f"example {i} is missing")
        if i == self.fatal:
            os._exit(3)
        return torch.tensor([float(i)]), torch.tensor(os.getpid())


def loader(dataset: Dataset, count: int = 2, **settings) -> LoaderProcesses:
    items = _SeededItems(dataset, None, ())
    settings = {"multiprocessing_context": "fork", **settings}
    return LoaderProcesses(items, count, collate_pairs, settings)


def rows(*rows) -> list[np.ndarray]:
    return [np.asarray(row) for row in rows]


def test_batches_come_in_the_stream_order_from_every_process():
    processes = loader(Rows())
    try:
        batches = np.arange(40).reshape(10, 4)
        processes.stream(0, batches)
        read = [processes.next() for _ in batches]
        assert [X.ravel().tolist() for X, _ in read] == batches.tolist()
        pids = {int(pid) for _, y in read for pid in y}
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        processes.close()


def test_a_new_stream_drops_what_was_read_ahead_for_the_last():
    processes = loader(Rows(), prefetch_factor=3)
    try:
        processes.stream(0, np.arange(20).reshape(20, 1))
        assert processes.next()[0].item() == 0
        processes.stream(0, rows([50], [51], [52]))
        assert [processes.next()[0].item() for _ in range(3)] == [50, 51, 52]
    finally:
        processes.close()


def test_a_reading_error_is_raised_with_its_own_type_where_the_batch_is_taken():
    processes = loader(Rows(bad=5), count=1)
    try:
        processes.stream(0, rows([1, 2], [4, 5], [6]))
        assert processes.next()[0].ravel().tolist() == [1.0, 2.0]
        with pytest.raises(KeyError, match="example 5 is missing"):
            processes.next()
        assert processes.next()[0].item() == 6.0  # the process reads on
    finally:
        processes.close()


def test_a_process_that_dies_fails_the_take_instead_of_hanging():
    processes = loader(Rows(fatal=3), count=1)
    try:
        processes.stream(0, rows([3]))
        with pytest.raises(RuntimeError, match="exited unexpectedly.*exit code 3"):
            processes.next()
    finally:
        processes.close()


def test_close_stops_every_process():
    processes = loader(Rows())
    started = list(processes._processes)
    processes.stream(0, rows([1], [2]))
    processes.next()  # one batch left unread
    processes.close()
    assert started and not any(p.is_alive() for p in started)


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(TypeError, match="iterator_train__drop_last_batches"):
        loader(Rows(), drop_last_batches=True)
    # With or without loader processes, before anything is read.
    for num_workers in (0, 1):
        with pytest.raises(TypeError, match="iterator_train__in_order"):
            DatasetExamples(Rows(), loader_params={"num_workers": num_workers, "in_order": True})


def test_examples_with_loader_processes_read_where_the_processes_run():
    examples = DatasetExamples(Rows(), loader_params={"num_workers": 1})
    try:
        order = torch.randperm(64)
        rows = order.unfold(0, 8, 8)
        examples.prefetch(rows)
        for row in rows:
            X, pid = examples.take(row)
            assert X.ravel().tolist() == row.float().tolist()
            assert set(pid.tolist()) != {os.getpid()}
    finally:
        examples.close()
