"""Datasets that open their files where they are used.

A dataset given to ``fit`` travels to the Dask workers as the object itself,
pickled. For data that does not fit in memory, write it to follow this
contract, as :class:`NpyDataset` does:

- **picklable and small**: it holds paths (or a connection string), never
  the data; ``__getstate__`` drops any open file, memory map or connection;
- **opens lazily**: files are opened on the first ``__getitem__`` in each
  process (a Dask worker, a ``DataLoader`` worker), not in ``__init__``;
- ``__len__``: the number of examples, known without reading them;
- ``__getitem__(i)`` returns ``(x, y)`` for example ``i`` (tensors, arrays or
  numbers); a random transform drawn here draws anew at every use;
- optionally ``targets``: all targets as one small array, which a
  stratified validation split and ``score(dataset)`` use instead of
  reading every example;
- optionally ``random_generators``: the global generators its reads draw
  from (of ``"torch"``, ``"numpy"``, ``"random"``), which a fit with
  ``random_state`` seeds per (epoch, example). Without it, the fit reads
  three examples to see which they draw from; name them when only some
  examples draw.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class NpyDataset(Dataset):
    """Examples and targets in two ``.npy`` files, opened on first use.

    Each process that reads it (the client for prediction, each Dask
    worker, each loader process) opens the files itself, and reads only the
    rows it uses: one positioned read per example, through the kernel's page
    cache, into the example's own buffer. The object pickles as its two
    paths. Nothing is memory-mapped for the examples: a map read at random
    rows can map far more than it reads (the kernel maps whole blocks of the
    page cache around each faulted page), and pages that only one process
    maps count as its private memory. For a file written through a memory
    map, reading 25 MB of 12 KiB rows that way mapped 277 MB.

    Parameters
    ----------
    x_path, y_path : str or os.PathLike
        ``.npy`` files (``np.save``) with one row per example; same length.
        The targets are memory-mapped (they are small and read in order).
    transform : callable or None, default=None
        Applied to each input tensor when read (e.g. a random crop); it
        must pickle too.

    Examples
    --------
    >>> np.save("X.npy", X); np.save("y.npy", y)            # doctest: +SKIP
    >>> est.fit(NpyDataset("X.npy", "y.npy"))               # doctest: +SKIP
    """

    def __init__(
        self,
        x_path: str | os.PathLike,
        y_path: str | os.PathLike,
        transform: Any = None,
    ):
        self.x_path, self.y_path = os.fspath(x_path), os.fspath(y_path)
        self.transform = transform
        self._rows: _NpyRows | None = None
        self._y: np.ndarray | None = None
        self._len = _NpyRows.header(self.x_path)[0][0]
        n_y = _NpyRows.header(self.y_path)[0][0]
        if n_y != self._len:
            raise ValueError(
                f"{self.x_path} has {self._len} rows and {self.y_path} {n_y}: "
                "they need one target per example."
            )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows = _NpyRows(self.x_path)
        x = torch.from_numpy(self._rows.read(index))
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.from_numpy(np.array(self.targets[index]))

    @property
    def targets(self) -> np.ndarray:
        """All targets (mapped, not read whole until used)."""
        if self._y is None:
            self._y = np.load(self.y_path, mmap_mode="r")
        return self._y

    def __getstate__(self) -> dict:
        # The paths travel; each process opens the files itself.
        return {**self.__dict__, "_rows": None, "_y": None}


class _NpyRows:
    """One ``.npy`` file's rows, each read on its own with a positioned read."""

    def __init__(self, path: str):
        self.path = path
        (self.shape, self.dtype, self.offset), fortran = self.header(path, with_order=True)
        if fortran:
            raise ValueError(
                f"{path} is stored in Fortran order, so a row is not contiguous on "
                "disk: save it as np.save(path, np.ascontiguousarray(X))."
            )
        self.row_shape = self.shape[1:]
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        # Where os.preadv is missing (Windows), a seek and a read, one thread at a time.
        self._lock = threading.Lock()

    @staticmethod
    def header(path: str, with_order: bool = False):
        """``(shape, dtype, data offset)`` from the file's header (and Fortran order if asked)."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
        if not shape:
            raise ValueError(f"{path} holds a scalar, not one row per example.")
        if dtype.hasobject:
            raise ValueError(f"{path} holds Python objects; save numeric arrays.")
        found = (tuple(shape), dtype, offset)
        return (found, fortran) if with_order else found

    def read(self, index: int) -> np.ndarray:
        n = self.shape[0]
        if not -n <= index < n:
            raise IndexError(f"row {index} of {n} in {self.path}")
        position = self.offset + (index % n) * self.row_bytes
        row = np.empty(self.row_shape, dtype=self.dtype)
        buffer = row.data.cast("B")
        if hasattr(os, "preadv"):  # straight into the row: no copy
            got = os.preadv(self.fd, [buffer], position)
        else:  # pragma: no cover - platform dependent
            with self._lock:
                os.lseek(self.fd, position, os.SEEK_SET)
                data = os.read(self.fd, self.row_bytes)
            buffer[: len(data)] = data
            got = len(data)
        if got != self.row_bytes:
            raise OSError(
                f"{self.path}: row {index} is cut short ({got} of {self.row_bytes} bytes)"
            )
        return row

    def __del__(self) -> None:
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
