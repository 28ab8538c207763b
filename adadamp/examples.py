"""How an engine reaches training examples: ``take(indices) -> (X, y)``.

Every engine and every loss pass reads the training set through this one
interface, so a new way of holding data (a dataset read on the worker, say)
is one new class here and no change in the engines.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import random
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset, default_collate

from ._loader_processes import LoaderProcesses, check_settings, read_batch


@runtime_checkable
class Examples(Protocol):
    """A training set that an engine can index with a tensor of positions.

    Implementations must pickle (the Dask engines send them to workers) and
    return tensors on the device given to :meth:`to`. Two methods are
    optional, and called through :func:`prefetch` and :func:`set_epoch`:
    ``prefetch(indices)``, a cheap hint that the coming :meth:`take` calls
    will likely ask for the rows of ``indices``, in order (a wrong guess
    must cost only the work thrown away), and ``set_epoch(epoch)``, the
    epoch the coming takes belong to.
    """

    def __len__(self) -> int: ...

    @property
    def device(self) -> torch.device:
        """Where the indices given to :meth:`take` live, and the tensors it returns."""
        ...

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and targets of the examples at ``indices``, in that order."""
        ...

    def to(self, device: torch.device | str) -> Examples:
        """These examples, read onto ``device``."""
        ...


class TensorExamples:
    """Examples held as two in-memory tensors: one gather per update.

    Parameters
    ----------
    X, y : torch.Tensor
        Inputs and targets, one row per example.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        if len(X) != len(y):
            raise ValueError(f"X and y have different lengths ({len(X)} and {len(y)}).")
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[indices], self.y[indices]

    def prefetch(self, indices: torch.Tensor) -> None:
        """Nothing to fetch ahead: a gather from memory is the fast path."""

    def to(self, device: torch.device | str) -> TensorExamples:
        return TensorExamples(self.X.to(device), self.y.to(device))

    @property
    def device(self) -> torch.device:
        return self.X.device


def prefetch(examples: Examples, indices: torch.Tensor) -> None:
    """Tell ``examples`` which indices are likely asked for next (a hint; may be ignored).

    ``indices`` is 2-D, a row per coming :meth:`~Examples.take`, in order,
    or 1-D for the next take alone.
    """
    hint = getattr(examples, "prefetch", None)
    if hint is not None:
        hint(indices)


def set_epoch(examples: Examples, epoch: int) -> None:
    """Tell ``examples`` the epoch that the coming :meth:`~Examples.take` calls belong to.

    Datasets seed their transforms from it (see :class:`DatasetExamples`);
    in-memory examples have nothing to do.
    """
    setter = getattr(examples, "set_epoch", None)
    if setter is not None:
        setter(epoch)


def close(examples: Examples) -> None:
    """Release what ``examples`` started (loader processes), if it has a ``close``."""
    closer = getattr(examples, "close", None)
    if closer is not None:
        closer()


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for the draw of example ``index`` in ``epoch`` (splitmix64 mixing).

    Cheap (it runs once per example used) and different for every triple in practice.
    """
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & 0xFFFFFFFF


# The global generators that a dataset's transforms draw from, and that a
# seeded read seeds: torch's CPU generator, NumPy's legacy one, Python's.
GENERATORS = ("torch", "numpy", "random")


def generators_drawn(dataset: TorchDataset, indices: list[int]) -> tuple[str, ...]:
    """Which of :data:`GENERATORS` reading ``dataset[i]`` draws from, for ``i`` in ``indices``.

    Each generator is seeded, the item read, and its state compared with
    the seeded one: a generator whose state moved was drawn from. Seeding
    one costs 1 to 4 µs per example, more than reading a tensor row, so a
    fit seeds only those that its dataset's reads draw from (none, for a
    dataset without random transforms). The generators are restored after.
    """
    drawn: set[str] = set()
    with _restored_generators(GENERATORS):
        for index in indices:
            _seed_generators(GENERATORS, 0)
            before = _generator_states()
            dataset[index]
            after = _generator_states()
            drawn |= {n for n in GENERATORS if not _SAME_STATE[n](before[n], after[n])}
    return tuple(name for name in GENERATORS if name in drawn)


def probe_indices(n: int) -> list[int]:
    """The examples :func:`generators_drawn` reads: the first, the middle and the last."""
    return sorted({0, n // 2, n - 1})


def declared_generators(dataset: TorchDataset) -> tuple[str, ...] | None:
    """The dataset's ``random_generators`` (through ``Subset`` wrappers), or None.

    A dataset that draws from a global generator only for some examples
    names them so, since a probe of three examples may not see the draw.
    """
    while isinstance(dataset, Subset) and not hasattr(dataset, "random_generators"):
        dataset = dataset.dataset
    declared = getattr(dataset, "random_generators", None)
    if declared is None:
        return None
    unknown = set(declared) - set(GENERATORS)
    if unknown:
        raise ValueError(
            f"random_generators of {type(dataset).__name__} names {sorted(unknown)}: "
            f"the global generators seeded per example are {GENERATORS}."
        )
    return tuple(name for name in GENERATORS if name in declared)


# How to seed, read, restore and compare each of GENERATORS' state. Torch's
# is seeded through the generator's own manual_seed: torch.manual_seed also
# seeds every accelerator, a hundred times slower per call.
_SEED: dict[str, Callable[[int], Any]] = {
    "torch": torch.default_generator.manual_seed,
    "numpy": np.random.seed,
    "random": random.seed,
}
_GET_STATE: dict[str, Callable[[], Any]] = {
    "torch": torch.get_rng_state,
    "numpy": np.random.get_state,
    "random": random.getstate,
}
_SET_STATE: dict[str, Callable[[Any], Any]] = {
    "torch": torch.set_rng_state,
    "numpy": np.random.set_state,
    "random": random.setstate,
}
_SAME_STATE: dict[str, Callable[[Any, Any], bool]] = {
    "torch": torch.equal,
    # ("MT19937", keys, position, has_gauss, cached_gaussian): the keys are an array.
    "numpy": lambda a, b: np.array_equal(a[1], b[1]) and a[0] == b[0] and a[2:] == b[2:],
    "random": lambda a, b: a == b,
}


def _generator_states(generators: tuple[str, ...] = GENERATORS) -> dict[str, Any]:
    return {name: _GET_STATE[name]() for name in generators}


def _seed_generators(generators: tuple[str, ...], seed: int) -> None:
    for name in generators:
        _SEED[name](seed)


class _SeededItems:
    """``dataset[i]`` of an epoch, its randomness seeded from ``(seed, epoch, i)``.

    The global ``generators`` (names from :data:`GENERATORS`) are seeded
    before each item and restored after the batch, so that a transform
    draws the same values for the same (seed, epoch, example) on any rank,
    worker or loader process, and the rest of the program sees its
    generators untouched. With ``seed=None``, or no generator to seed, the
    items are read as they are: in one call of the dataset's own
    ``__getitems__`` if it has one (as a ``DataLoader`` reads a batch), else
    one ``dataset[i]`` each.
    """

    def __init__(self, dataset: TorchDataset, seed: int | None, generators: tuple[str, ...]):
        self.dataset, self.seed, self.generators = dataset, seed, generators

    def read(self, epoch: int, indices: list[int]) -> list:
        """The items of ``indices`` as read in ``epoch``."""
        if self.seed is None or not self.generators:
            read_many = getattr(self.dataset, "__getitems__", None)
            if callable(read_many):
                return list(read_many(indices))
            return [self.dataset[index] for index in indices]
        seed, generators = self.seed, self.generators
        # Saved and restored once per batch: saving NumPy's costs ~0.1 ms.
        with _restored_generators(generators):
            return [
                _seeded_read(self.dataset, generators, item_seed(seed, epoch, i), i)
                for i in indices
            ]


@contextlib.contextmanager
def _restored_generators(generators: tuple[str, ...]):
    """Restore the global ``generators`` on leaving."""
    states = _generator_states(generators)
    try:
        yield
    finally:
        for name, state in states.items():
            _SET_STATE[name](state)


def _seeded_read(dataset: TorchDataset, generators: tuple[str, ...], seed: int, index: int):
    _seed_generators(generators, seed)
    return dataset[index]


def seeded_item(dataset: TorchDataset, seed: int, index: int):
    """``dataset[index]`` with every global generator seeded by ``seed``, then restored."""
    with _restored_generators(GENERATORS):
        return _seeded_read(dataset, GENERATORS, seed, index)


def collate_pairs(items: list) -> Any:
    """``default_collate`` of a batch, with a fast path for ``(tensor, tensor)`` items.

    ``default_collate`` inspects every item before it stacks (about 1 µs per
    example, as much as reading a row of a tensor); items that are pairs of
    tensors of one shape each are stacked directly.
    """
    first = items[0]
    pairs = (
        type(first) is tuple
        and len(first) == 2
        and isinstance(first[0], torch.Tensor)
        and isinstance(first[1], torch.Tensor)
    )
    if pairs:
        xs, ys = zip(*items)
        try:
            return torch.stack(xs), torch.stack(ys)
        except (RuntimeError, TypeError):  # ragged shapes or mixed dtypes: the general path
            pass
    return default_collate(items)


# Rows of example indices, a batch each: a 2-D tensor, or a list of 1-D ones.
Rows = torch.Tensor | Sequence[torch.Tensor]


class _Stream:
    """The coming takes, a row of ``rows`` each, read in order by the loader processes.

    Each process is sent its rows once (on the examples' thread, beside the
    computation) and reads ``prefetch_factor`` batches ahead on its own; a
    take is a ``next`` with no hand-shake.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        epoch: int,
        thread: concurrent.futures.ThreadPoolExecutor,
        start: Callable[[int, Rows], Iterator],
    ):
        self.rows, self.epoch, self.taken = rows, epoch, 0
        self._iterator = thread.submit(start, epoch, rows)

    def expects(self, indices: torch.Tensor) -> bool:
        """Whether ``indices`` is the next take's row."""
        return self.taken < len(self.rows) and torch.equal(self.rows[self.taken], indices)

    def next_batch(self) -> Any:
        """The collated batch of the next row (:meth:`expects` said it is asked for)."""
        self.taken += 1
        return next(self._iterator.result())


# Loader settings that DatasetExamples decides itself.
_OWN_LOADER_KEYS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last", "dataset")


class DatasetExamples:
    """Examples read from a map-style ``torch.utils.data.Dataset`` at every use.

    ``take(indices)`` reads ``dataset[i]`` for each index, collated as a
    ``DataLoader`` would, so a random transform draws anew every time an
    example is used. Only the dataset object travels to Dask workers: a
    dataset that opens its files on first use
    (:class:`adadamp.data.NpyDataset`) is read on the worker, only for the
    examples it uses.

    With loader processes (``num_workers >= 1``,
    :mod:`adadamp._loader_processes`), the next updates' examples load
    while the current one computes, once the engine's hint
    (:func:`prefetch`) has named the coming takes; a take that is not the
    one named (a loss pass, a batch size that changed) drops what was read
    ahead and is read alone. Without them, each take is read in the
    calling thread, when it is asked for: a thread beside the computation
    hid nothing of the reads, which hold the interpreter lock that the
    computation's operators take back between calls, and it cost a
    hand-off per take (``benchmarks/data.py``: 1.26 to 1.37 times the
    arrays' update on two ranks, against 1.09 to 1.23 read in the rank).

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        Map-style: ``len(dataset)`` and ``dataset[i] -> (x, y)``.
    seed : int or None, default=None
        Seeds each example's draw from ``(seed, epoch, index)``; None draws freely.
    float_dtype : torch.dtype or None, default=None
        Floating inputs (and floating targets, unless ``target_dtype`` is
        given) are cast to it: the module's dtype.
    target_dtype : torch.dtype or None, default=None
        The targets' dtype (``torch.long`` for a classifier).
    loader_params : dict or None, default=None
        ``DataLoader`` keywords (the estimator's ``iterator_train__*``) of
        :data:`adadamp._loader_processes.SETTINGS`: ``num_workers`` (loader
        processes), ``pin_memory``, ``collate_fn``, and for the loader
        processes ``prefetch_factor``, ``worker_init_fn``,
        ``multiprocessing_context``, ``timeout`` and ``generator``; others
        are refused by name. Batching and order are the engine's:
        ``batch_size``, ``shuffle`` and samplers are ignored.
    generators : tuple of str or None, default=None
        The global generators (:data:`GENERATORS`) that ``seed`` seeds per
        example; None: the dataset's ``random_generators`` attribute if it
        has one, else those that reading a few examples draws from
        (:func:`generators_drawn`).
    """

    def __init__(
        self,
        dataset: TorchDataset,
        seed: int | None = None,
        float_dtype: torch.dtype | None = None,
        target_dtype: torch.dtype | None = None,
        loader_params: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        generators: tuple[str, ...] | None = None,
    ):
        self.dataset = dataset
        self.seed = seed
        if seed is None:
            generators = ()
        elif generators is None:
            generators = declared_generators(dataset)
        if generators is None:
            generators = generators_drawn(dataset, probe_indices(len(dataset)))  # type: ignore[arg-type]
        self.generators = tuple(generators)
        self.float_dtype, self.target_dtype = float_dtype, target_dtype
        self.loader_params = {
            k: v for k, v in (loader_params or {}).items() if k not in _OWN_LOADER_KEYS
        }
        check_settings(self.loader_params)
        self._device = torch.device(device)
        self.epoch = 0
        self._items = _SeededItems(dataset, seed, self.generators)
        self._collate = self.loader_params.get("collate_fn", collate_pairs)
        self._loader: LoaderProcesses | None = None
        self._stream: _Stream | None = None
        # Worker threads of one Dask worker may share these examples.
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> DatasetExamples:
        return DatasetExamples(
            self.dataset,
            self.seed,
            self.float_dtype,
            self.target_dtype,
            self.loader_params,
            device,
            self.generators,
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the coming takes: it seeds the transforms' draws."""
        if epoch != self.epoch:
            self._stream = None
        self.epoch = epoch

    # ------------------------------------------------------------ loading
    @property
    def num_workers(self) -> int:
        """Loader processes used here: none inside a daemonic process (it may not fork)."""
        wanted = int(self.loader_params.get("num_workers", 0))
        if wanted and multiprocessing.current_process().daemon:
            _warn_daemonic(wanted)
            return 0
        return wanted

    def _parts(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """One take's indices as batches, one per loader process, so that they load in parallel."""
        parts = max(1, min(self.num_workers, len(indices)))
        return list(indices.split(-(-len(indices) // parts)))

    def _open_loader(self) -> LoaderProcesses:
        """The loader processes (``num_workers`` of them), started on first use."""
        if self._loader is None:
            params = dict(self.loader_params)
            for key in ("num_workers", "pin_memory", "collate_fn"):  # used here, not there
                params.pop(key, None)
            if self.seed is not None:
                # The loader processes' base seed is drawn from this generator,
                # not from (and so without advancing) the global one.
                params.setdefault("generator", torch.Generator().manual_seed(self.seed))
            if "fork" in multiprocessing.get_all_start_methods():
                # A Dask worker's default start method is spawn, which
                # pickles the dataset by reference and so fails for a
                # class defined in the fitting script (Dask sent it by
                # value); fork, torch's usual default on Linux, copies it.
                params.setdefault("multiprocessing_context", "fork")
            self._loader = LoaderProcesses(self._items, self.num_workers, self._collate, params)
        return self._loader

    def _start(self, epoch: int, rows: Rows) -> Iterator:
        """The loader processes' batches, one per row of ``rows``, examples of ``epoch``.

        Run only on :attr:`_thread`.
        """
        loader = self._open_loader()
        # As index arrays, not keys: an epoch of a large set is a few
        # megabytes to send, where its (epoch, index) tuples are a
        # hundred bytes per example.
        loader.stream(epoch, [row.numpy() for row in rows])
        return (loader.next() for _ in range(len(rows)))

    @property
    def _thread(self) -> concurrent.futures.ThreadPoolExecutor:
        # One thread talks to the loader processes, so that a stream's
        # hand-shake happens beside the computation rather than in it.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "adadamp-loader")
        return self._executor

    def prefetch(self, indices: torch.Tensor) -> None:
        """Have the loader processes read the coming takes, the rows of ``indices``, ahead.

        The rows become a :class:`_Stream` unless the current one already
        expects the first; a 1-D ``indices`` is one take. Without loader
        processes, nothing is read ahead.
        """
        if not self.num_workers or not len(indices):
            return
        rows = indices if indices.dim() == 2 else indices.unsqueeze(0)
        with self._lock:
            if self._stream is None or not self._stream.expects(rows[0]):
                self._stream = _Stream(rows, self.epoch, self._thread, self._start)

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._stream is not None and self._stream.expects(indices):
                parts = [self._stream.next_batch()]
            elif self.num_workers:
                self._stream = None
                rows = self._parts(indices)
                batches = self._thread.submit(self._start, self.epoch, rows).result()
                parts = list(batches)
            else:
                parts = [read_batch(self._items, self._collate, self.epoch, indices)]
        # A loader process's parts come back as NumPy arrays (they travel by value);
        # a lone part is used as it is, not copied by a concatenation.
        X, y = (
            torch.cat([_as_tensor(a) for a in t]) if len(t) > 1 else _as_tensor(t[0])
            for t in zip(*parts)
        )
        return self._cast(X, y)

    def _cast(self, X, y) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = cast_pair(_as_tensor(X), _as_tensor(y), self.float_dtype, self.target_dtype)
        non_blocking = self._device.type == "cuda"
        if non_blocking and self.loader_params.get("pin_memory"):
            X, y = X.pin_memory(), y.pin_memory()
        return X.to(self._device, non_blocking=non_blocking), y.to(
            self._device, non_blocking=non_blocking
        )

    def close(self) -> None:
        """Stop the loader processes (they also stop when these examples are collected)."""
        self._stream = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._loader is not None:
            self._loader.close()
        self._loader = None

    def __getstate__(self) -> dict:
        # Loader processes and their queues belong to this process: a copy
        # (on a Dask worker) starts its own.
        state = self.__dict__.copy()
        state["_loader"], state["_stream"] = None, None
        state["_executor"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def cast_pair(
    X: torch.Tensor,
    y: torch.Tensor,
    float_dtype: torch.dtype | None,
    target_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets in the dtypes the module computes with.

    Floating inputs take ``float_dtype`` (scikit-learn emits float64, modules
    are float32); targets take ``target_dtype`` if given, else floating ones
    take ``float_dtype``.
    """
    X, y = _as_tensor(X), _as_tensor(y)
    if float_dtype is not None and X.is_floating_point():
        X = X.to(float_dtype)
    if target_dtype is not None:
        y = y.to(target_dtype)
    elif float_dtype is not None and y.is_floating_point():
        y = y.to(float_dtype)
    return X, y


def _as_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, (list, tuple)):
        raise TypeError(
            "The dataset's items must be (x, y) with x and y a tensor, array or number "
            f"each; one of them collated to a {type(data).__name__}."
        )
    return torch.as_tensor(data)


_WARNED_DAEMONIC = False


def _warn_daemonic(wanted: int) -> None:
    global _WARNED_DAEMONIC
    if not _WARNED_DAEMONIC:
        _WARNED_DAEMONIC = True
        warnings.warn(
            f"iterator_train__num_workers={wanted} ignored in this daemonic process (a Dask "
            "worker started with distributed.worker.daemon=True may not start loader "
            "processes): examples load in the worker itself. Set "
            'dask.config.set({"distributed.worker.daemon": False}) before starting the '
            "cluster to load in loader processes.",
            RuntimeWarning,
            stacklevel=3,
        )


class SparseExamples:
    """Examples whose inputs are a SciPy sparse matrix: rows densified per update.

    :meth:`take` gathers the rows asked for and densifies only those, so the
    whole matrix is never dense in memory. The matrix stays on the CPU (SciPy
    has no devices); the dense rows and the targets live on :attr:`device`.

    Parameters
    ----------
    X : scipy.sparse matrix or array
        Inputs, one row per example; stored as CSR (fast row gathers).
    y : torch.Tensor
        Targets, one row per example.
    dtype : torch.dtype or None, default=None
        Floating rows are cast to it (the module's dtype); None keeps the
        matrix's.
    """

    def __init__(self, X, y: torch.Tensor, dtype: torch.dtype | None = None):
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D sparse matrix, got {X.ndim} dimensions.")
        if X.shape[0] != len(y):
            raise ValueError(f"X and y have different lengths ({X.shape[0]} and {len(y)}).")
        self.X, self.y, self.dtype = X.tocsr(), y, dtype

    def __len__(self) -> int:
        return self.X.shape[0]

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.X[indices.cpu().numpy()].toarray())
        if self.dtype is not None and rows.is_floating_point():
            rows = rows.to(self.dtype)
        return rows.to(self.device), self.y[indices]

    def to(self, device: torch.device | str) -> SparseExamples:
        return SparseExamples(self.X, self.y.to(device), self.dtype)

    @property
    def device(self) -> torch.device:
        return self.y.device
