"""How an engine reaches training examples: ``take(indices) -> (X, y)``.

Every engine and every loss pass reads the training set through this one
interface, so a new way of holding data (a dataset read on the worker, say)
is one new class here and no change in the engines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Examples(Protocol):
    """A training set that an engine can index with a tensor of positions.

    Implementations must pickle (the Dask engines send them to workers) and
    return tensors on the device given to :meth:`to`.
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

    def to(self, device: torch.device | str) -> TensorExamples:
        return TensorExamples(self.X.to(device), self.y.to(device))

    @property
    def device(self) -> torch.device:
        return self.X.device


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
