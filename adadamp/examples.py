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
