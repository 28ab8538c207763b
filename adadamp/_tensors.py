"""Turning a skorch training dataset into two tensors, once per fit."""

from __future__ import annotations

import torch
from skorch.dataset import Dataset
from torch.utils.data import DataLoader, Subset


def _to_tensor(data) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.as_tensor(data)


def dataset_to_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as ``(X, y)`` tensors.

    Engines index the training set with whole index arrays (one gather per
    update rather than one ``__getitem__`` per example), so it is materialised
    once. skorch's own datasets and their subsets are sliced directly.
    """
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, Dataset):
        X, y = dataset_to_tensors(dataset.dataset)
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return X[idx], y[idx]
    if isinstance(dataset, Dataset) and dataset.y is not None and not isinstance(dataset.X, dict):
        return _to_tensor(dataset.X), _to_tensor(dataset.y)
    X, y = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
    return _to_tensor(X), _to_tensor(y)


def match_dtype(X: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Cast floating inputs to the module's floating dtype.

    scikit-learn transformers emit float64 while modules are float32; casting
    here lets an estimator sit in a Pipeline after a ``StandardScaler``.
    """
    param = next(module.parameters(), None)
    if param is not None and X.is_floating_point() and X.dtype != param.dtype:
        return X.to(param.dtype)
    return X
