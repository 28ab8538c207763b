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
  reading every example.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Bytes of inputs read between two releases of the mapped pages.
RELEASE_EVERY_BYTES = 64 << 20


class NpyDataset(Dataset):
    """Examples and targets in two ``.npy`` files, memory-mapped on first use.

    Each process that reads it (the client for prediction, each Dask
    worker, each loader process) maps the files itself, and only the pages
    of the examples it reads come into memory; the object pickles as its
    two paths. Pages read are handed back to the kernel's page cache every
    64 MiB read, so a process that reads the whole file over an epoch does
    not keep it resident (mapped pages only this process touched count as
    its private memory).

    Parameters
    ----------
    x_path, y_path : str or os.PathLike
        ``.npy`` files (``np.save``) with one row per example; same length.
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
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._read = 0  # bytes read since the pages were last released
        # The length from the headers alone, without reading the data.
        self._len = _npy_length(self.x_path)
        if (n_y := _npy_length(self.y_path)) != self._len:
            raise ValueError(
                f"{self.x_path} has {self._len} rows and {self.y_path} {n_y}: "
                "they need one target per example."
            )

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._x is None or self._y is None:
            self._x = np.load(self.x_path, mmap_mode="r")
            self._y = np.load(self.y_path, mmap_mode="r")
        return self._x, self._y

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self._open()
        # np.array copies the row out of the map: the tensor owns its memory.
        row = np.array(X[index])
        self._read += row.nbytes
        if self._read >= RELEASE_EVERY_BYTES:
            self._release_pages()
        x = torch.from_numpy(row)
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.from_numpy(np.array(y[index]))

    def _release_pages(self) -> None:
        self._read = 0
        mapped = getattr(self._x, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            # The pages stay in the page cache: a later read maps them again.
            mapped.madvise(mmap.MADV_DONTNEED)

    @property
    def targets(self) -> np.ndarray:
        """All targets (mapped, not read whole until used)."""
        return self._open()[1]

    def __getstate__(self) -> dict:
        # The paths travel; each process maps the files itself.
        state = self.__dict__.copy()
        state["_x"] = state["_y"] = None
        state["_read"] = 0
        return state


def _npy_length(path: str) -> int:
    # Mapping reads only the header; the map is dropped at once.
    shape = np.load(path, mmap_mode="r").shape
    if not shape:
        raise ValueError(f"{path} holds a scalar, not one row per example.")
    return int(shape[0])
