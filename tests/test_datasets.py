"""Map-style datasets as training data: read at every use, seeded, on every engine."""

from __future__ import annotations

import os
import pickle
import random
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, weights  # noqa: F401
from skorch.dataset import ValidSplit
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from adadamp import DaskClassifier
from adadamp._training_data import training_examples
from adadamp.data import NpyDataset
from adadamp.examples import (
    DatasetExamples,
    TensorExamples,
    collate_pairs,
    generators_drawn,
    probe_indices,
)

N = 96


class Digits(Dataset):
    """The digits as a plain map-style dataset (no transform)."""

    def __init__(self, n: int = N):
        self.X, self.y = digits(n)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


class ShiftedDigits(Digits):
    """Each use adds a random shift, and appends ``pid index shift`` to a log file."""

    def __init__(self, log: str, n: int = N):
        super().__init__(n)
        self.log = log

    def __getitem__(self, i):
        shift = float(torch.rand(()))
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {i} {shift!r}\n")
        return self.X[i] + shift, self.y[i]


class NumpyAndRandomShifted(Digits):
    """Each use adds shifts drawn from NumPy's and Python's global generators."""

    def __getitem__(self, i):
        return self.X[i] + np.random.rand() + random.random(), self.y[i]


class ReadThreads(Digits):
    """Records the name of the thread of each read."""

    def __init__(self, n: int = N):
        super().__init__(n)
        self.threads: list[str] = []

    def __getitem__(self, i):
        self.threads.append(threading.current_thread().name)
        return super().__getitem__(i)


class ShiftedReadThreads(ReadThreads):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return x + float(torch.rand(())), y


def draws(log: str) -> dict[int, list[tuple[int, float]]]:
    """index -> [(pid, shift), ...] in the order drawn."""
    out: dict[int, list[tuple[int, float]]] = defaultdict(list)
    with open(log) as f:
        for line in f:
            pid, index, shift = line.split()
            out[int(index)].append((int(pid), float(shift)))
    return out


def estimator(**kwargs) -> DaskClassifier:
    params = dict(
        batch_size=32,
        max_epochs=3,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
        lr=0.1,
    )
    params.update(kwargs)
    return DaskClassifier(MLP, **params)


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(weights(a), weights(b)))


# --------------------------------------------------------------------------- choosing examples


def test_arrays_and_tensor_datasets_keep_the_gather_path():
    X, y = digits(10)
    common = dict(seed=0, float_dtype=torch.float32, target_dtype=torch.long)
    tensors = training_examples(TensorDataset(torch.tensor(X), torch.tensor(y)), **common)
    assert isinstance(tensors, TensorExamples)
    assert isinstance(training_examples(Digits(10), **common), DatasetExamples)


def test_dataset_examples_cast_and_pickle_small(tmp_path):
    examples = DatasetExamples(Digits(10), float_dtype=torch.float64, target_dtype=torch.long)
    X, y = examples.take(torch.tensor([3, 1]))
    assert X.dtype == torch.float64 and y.dtype == torch.long
    np.testing.assert_array_equal(X.numpy(), digits(10)[0][[3, 1]])
    np.save(tmp_path / "X.npy", digits(10)[0])
    np.save(tmp_path / "y.npy", digits(10)[1])
    ds = NpyDataset(tmp_path / "X.npy", tmp_path / "y.npy")
    ds[0]  # opened here
    assert len(pickle.dumps(DatasetExamples(ds))) < 2000


def test_pairs_of_tensors_collate_as_default_collate_does():
    from torch.utils.data import default_collate

    rows = [(torch.randn(3, 2), torch.tensor(i)) for i in range(4)]
    for fast, default in zip(collate_pairs(rows), default_collate(rows)):
        assert torch.equal(fast, default) and fast.dtype == default.dtype
    # Anything else takes default_collate's path: arrays, numbers, ragged shapes.
    mixed = [(np.ones(2), 1), (np.zeros(2), 0)]
    assert [t.tolist() for t in collate_pairs(mixed)] == [[[1.0, 1.0], [0.0, 0.0]], [1, 0]]
    ragged = [(torch.ones(2), torch.tensor(0)), (torch.ones(3), torch.tensor(1))]
    with pytest.raises(RuntimeError):
        collate_pairs(ragged)


# --------------------------------------------------------------------------- draws per use


def test_augmentation_is_drawn_afresh_every_epoch_locally(tmp_path):
    log = str(tmp_path / "draws.txt")
    estimator(max_epochs=3).fit(ShiftedDigits(log))
    drawn = draws(log)
    # Index 0 is read once more on the client, to check the items are pairs,
    # and the probed ones once each, to see which generators they draw from.
    for index in set(range(N)) - {0, *probe_indices(N)}:
        shifts = [s for _, s in drawn[index]]
        assert len(shifts) == 3, (index, shifts)
        assert len(set(shifts)) == 3, (index, shifts)


@pytest.mark.parametrize("backend", ["centralized", "decentralized"])
def test_augmentation_is_drawn_on_the_workers_every_epoch(tmp_path, dask_client, backend):
    log = str(tmp_path / "draws.txt")
    local_log = str(tmp_path / "local.txt")
    est = estimator(backend=backend, client=dask_client, max_epochs=2, min_workers=2)
    est.fit(ShiftedDigits(log))
    ref = estimator(max_epochs=2).fit(ShiftedDigits(local_log))
    drawn, local = draws(log), draws(local_log)
    me = os.getpid()
    for index in set(range(N)) - {0, *probe_indices(N)}:
        on_workers = [(pid, s) for pid, s in drawn[index] if pid != me]
        assert len(on_workers) == 2, (index, drawn[index])
        assert on_workers[0][1] != on_workers[1][1]
        # Seeded per (epoch, example): the same draws as the local engine's.
        assert [s for _, s in on_workers] == [s for _, s in local[index]]
    assert len({pid for entries in drawn.values() for pid, _ in entries} - {me}) == 2
    assert max_diff(est, ref) < 1e-5


# --------------------------------------------------------------------------- reproducible


def test_same_random_state_same_weights_and_global_rng_untouched(tmp_path):
    before = torch.get_rng_state()
    a = estimator().fit(ShiftedDigits(str(tmp_path / "a.txt")))
    assert torch.equal(torch.get_rng_state(), before)
    b = estimator().fit(ShiftedDigits(str(tmp_path / "b.txt")))
    assert max_diff(a, b) == 0.0
    c = estimator(random_state=1).fit(ShiftedDigits(str(tmp_path / "c.txt")))
    assert max_diff(a, c) > 1e-3


def test_seeded_reads_seed_only_the_generators_the_reads_draw_from(tmp_path):
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    assert generators_drawn(Digits(), probe_indices(N)) == ()
    assert generators_drawn(ShiftedDigits(str(tmp_path / "log.txt")), [5]) == ("torch",)
    assert generators_drawn(NumpyAndRandomShifted(), [5]) == ("numpy", "random")
    assert torch.equal(torch.get_rng_state(), states[0])  # the probe draws nothing for good
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    declared = Digits()
    declared.random_generators = ("random", "torch")
    assert DatasetExamples(declared, seed=0).generators == ("torch", "random")
    assert DatasetExamples(Subset(declared, [1, 2]), seed=0).generators == ("torch", "random")
    assert DatasetExamples(Digits(), seed=None).generators == ()
    # What is seeded makes a fit reproducible.
    a = estimator(max_epochs=1).fit(NumpyAndRandomShifted())
    b = estimator(max_epochs=1).fit(NumpyAndRandomShifted())
    assert max_diff(a, b) == 0.0
    c = estimator(max_epochs=1, random_state=1).fit(NumpyAndRandomShifted())
    assert max_diff(a, c) > 1e-3


def test_without_loader_processes_a_take_is_read_in_the_rank_when_asked_for():
    # A thread reading ahead hid nothing (the reads hold the interpreter lock)
    # and cost a hand-off per take: the rank reads each take itself.
    dataset = ReadThreads()
    examples = DatasetExamples(dataset)
    rows = torch.randperm(N).unfold(0, 16, 16)
    examples.prefetch(rows)
    time.sleep(0.05)
    assert dataset.threads == []  # nothing read ahead
    X, _ = examples.take(rows[0])
    assert torch.equal(X, torch.as_tensor(dataset.X[rows[0].numpy()]))
    assert dataset.threads == [threading.current_thread().name] * 16
    examples.close()
    # In a fit, every read runs in the rank's own thread, seeded or not.
    for data in (ReadThreads(), ShiftedReadThreads()):
        estimator(max_epochs=2).fit(data)
        assert not any(name.startswith("adadamp-loader") for name in data.threads)


def test_without_random_state_fits_differ(tmp_path):
    a = estimator(random_state=None, max_epochs=1).fit(Digits())
    b = estimator(random_state=None, max_epochs=1).fit(Digits())
    assert max_diff(a, b) > 1e-4


def test_loader_processes_give_the_same_weights(tmp_path):
    a = estimator().fit(ShiftedDigits(str(tmp_path / "a.txt")))
    b = estimator(iterator_train__num_workers=2).fit(ShiftedDigits(str(tmp_path / "b.txt")))
    assert max_diff(a, b) == 0.0
    pids = {pid for entries in draws(str(tmp_path / "b.txt")).values() for pid, _ in entries}
    assert len(pids - {os.getpid()}) == 2  # the draws ran in the loader processes


@pytest.mark.parametrize("num_workers", [0, 1])
def test_takes_named_ahead_and_takes_not_named_read_the_right_examples(num_workers):
    dataset = Digits()
    examples = DatasetExamples(dataset, loader_params={"num_workers": num_workers})
    order = torch.randperm(N)
    rows = order.unfold(0, 16, 16)  # six takes of 16, named ahead
    examples.prefetch(rows)
    asked = [rows[0], rows[1], order[:5], rows[2], rows[4], rows[5]]  # a loss pass, a skip
    try:
        for indices in asked:
            X, y = examples.take(indices)
            assert torch.equal(X, torch.as_tensor(dataset.X[indices.numpy()]))
            assert torch.equal(y, torch.as_tensor(dataset.y[indices.numpy()]))
    finally:
        examples.close()


def test_loader_processes_start_one_request_stream_per_epoch(monkeypatch):
    from adadamp import examples as examples_module

    starts = []
    start = examples_module.DatasetExamples._start
    monkeypatch.setattr(
        examples_module.DatasetExamples,
        "_start",
        lambda self, epoch, rows: starts.append(len(rows)) or start(self, epoch, rows),
    )
    estimator(max_epochs=2, iterator_train__num_workers=1).fit(Digits())
    # Each epoch's three updates of 32 are asked for once, at its first update,
    # and each loader process then reads them ahead without a new hand-shake.
    assert starts == [3, 3]


# --------------------------------------------------------------------------- same semantics


class BatchReads(Digits):
    """A dataset that reads a batch at once (``__getitems__``, as a DataLoader calls it)."""

    def __init__(self, n: int = N):
        super().__init__(n)
        self.batches: list[int] = []  # the size of each batch read

    def __getitems__(self, indices: list[int]) -> list:
        self.batches.append(len(indices))
        return list(zip(self.X[indices], self.y[indices]))


def test_a_dataset_that_reads_batches_is_read_a_batch_per_update():
    X, y = digits(N)
    arrays = estimator().fit(X, y)
    data = BatchReads()
    est = estimator().fit(data)
    assert max_diff(arrays, est) < 1e-6
    updates = [u["train_batch_size"] for epoch in est.history_[:, "batches"] for u in epoch]
    assert data.batches == updates


def test_dataset_trains_as_the_same_arrays():
    X, y = digits(N)
    arrays = estimator().fit(X, y)
    dataset = estimator().fit(Digits())
    assert max_diff(arrays, dataset) < 1e-6


@pytest.mark.parametrize(
    ("backend", "workers"), [("decentralized", 1), ("decentralized", 2), ("centralized", 2)]
)
def test_dataset_agrees_across_engines(dask_client, backend, workers):
    ref = estimator(max_epochs=2).fit(Digits())
    est = estimator(max_epochs=2, backend=backend, client=dask_client, min_workers=workers)
    est.fit(Digits())
    assert max_diff(ref, est) < 1e-5


def test_npy_dataset_trains_on_a_process_cluster(tmp_path, dask_client):
    X, y = digits(N)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    ds = NpyDataset(tmp_path / "X.npy", tmp_path / "y.npy")
    est = estimator(max_epochs=2, backend="decentralized", client=dask_client)
    est.fit(ds)
    ref = estimator(max_epochs=2).fit(X, y)
    assert max_diff(ref, est) < 1e-5
    assert est.score(ds) == pytest.approx(ref.score(X, y))


def _private_clean_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Clean:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Private_Clean line")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="Linux only")
def test_npy_dataset_reads_rows_without_mapping_the_file(tmp_path):
    rows, features = 5000, 3072  # 12 KiB rows, 61 MB of inputs
    # Written through a memory map, as the README suggests for large arrays
    # (its pages then sit in the page cache in large blocks).
    X = np.lib.format.open_memmap(
        tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(rows, features)
    )
    X[:] = np.random.default_rng(0).standard_normal((rows, features), dtype=np.float32)
    X.flush()
    del X
    np.save(tmp_path / "y.npy", np.arange(rows))
    ds = NpyDataset(tmp_path / "X.npy", tmp_path / "y.npy")
    order = np.random.default_rng(1).permutation(rows)[:2000]  # 25 MB read
    before = _private_clean_bytes()
    rows_read = [ds[int(i)][0] for i in order]
    grown = _private_clean_bytes() - before
    # Read through a memory map in this order, most of the file would be
    # mapped (the pages around each row come with it) and count as private.
    assert grown < 8e6, f"private memory grew {grown / 1e6:.0f} MB"
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    np.testing.assert_array_equal(rows_read[0].numpy(), X[order[0]])


# --------------------------------------------------------------------------- the surface


def test_fit_predict_score_and_partial_fit_on_a_dataset():
    X, y = digits(N)
    est = estimator().fit(Digits())
    np.testing.assert_array_equal(est.predict(Digits()), est.predict(X))
    assert est.predict_proba(Digits()).shape == (N, 10)
    assert est.score(Digits()) == est.score(X, y)
    updates = est.train_state_.model_updates
    est.partial_fit(Digits())
    assert est.train_state_.model_updates == 2 * updates  # max_epochs more epochs


def test_validation_split_of_a_dataset(tmp_path):
    X, y = digits(N)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    stratified = estimator(train_split=ValidSplit(4, stratified=True), max_epochs=1)
    stratified.fit(NpyDataset(tmp_path / "X.npy", tmp_path / "y.npy"))
    assert "valid_loss" in stratified.history_[-1]
    assert stratified.train_state_.n_examples == N * 3 // 4
    # Without `targets`, skorch's scorers need the classes named.
    plain = estimator(
        train_split=ValidSplit(4, stratified=False), max_epochs=1, classes=list(range(10))
    ).fit(Digits())
    assert "valid_acc" in plain.history_[-1]
    with pytest.raises(ValueError, match="stratified validation split of Digits needs its targets"):
        estimator(train_split=ValidSplit(4, stratified=True), max_epochs=1).fit(Digits())


# --------------------------------------------------------------------------- errors


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*digits(10))


class Inputs(Digits):
    def __getitem__(self, i):
        return self.X[i]


class Empty(Digits):
    def __len__(self) -> int:
        return 0


class Locked(Digits):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def test_iterable_dataset_is_refused():
    with pytest.raises(TypeError, match="IterableDataset.*map-style"):
        estimator().fit(Stream())


def test_items_that_are_not_pairs_are_refused():
    with pytest.raises(TypeError, match=r"X\[0\] is a ndarray, not an \(x, y\) pair"):
        estimator().fit(Inputs())


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="length 0"):
        estimator().fit(Empty())


@pytest.mark.parametrize("backend", ["centralized", "decentralized"])
def test_unpicklable_dataset_is_refused_before_any_cluster(backend):
    # No client: had it got that far, the fit would start a cluster of its own.
    with pytest.raises(TypeError, match="Locked.*cannot be pickled.*backend='local'"):
        estimator(backend=backend).fit(Locked())
    assert estimator(backend="local", max_epochs=1).fit(Locked()).history_


class Mapped(Dataset):
    """A dataset holding an open memory map: pickling it ships the whole array."""

    def __init__(self, path: str, n: int):
        self.X = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(n, 64))
        self.y = np.zeros(n, dtype="int64")

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i):
        return np.array(self.X[i]), self.y[i]


def test_data_larger_than_a_worker_is_refused_with_the_fix(tmp_path):
    from distributed import Client, LocalCluster

    # A sparse file: 640 MB mapped, nothing read.
    data = Mapped(str(tmp_path / "big.npy"), 2_500_000)
    with (
        LocalCluster(
            n_workers=1, processes=False, memory_limit="1GiB", dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        with pytest.raises(ValueError, match=r"does not fit in Dask worker .*NpyDataset"):
            estimator(backend="decentralized", client=client).fit(data)


class DiesOnWorkers(Digits):
    """Kills the process that unpickles it, unless that is the process that made it."""

    def __init__(self):
        super().__init__()
        self.home = os.getpid()

    def __setstate__(self, state):
        self.__dict__.update(state)
        if os.getpid() != self.home:
            os._exit(1)  # as the kernel or Dask's memory monitor would end a worker


@pytest.mark.slow
def test_workers_dying_while_loading_the_data_fail_the_fit_within_a_minute(fresh_dask_client):
    import time

    began = time.monotonic()
    with pytest.raises(RuntimeError, match="died while loading.*lazily") as error:
        estimator(backend="decentralized", client=fresh_dask_client).fit(DiesOnWorkers())
    assert time.monotonic() - began < 60, error.value
