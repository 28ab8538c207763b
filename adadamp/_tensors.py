"""The in-memory arrays behind a training dataset as two tensors, once per fit."""

from __future__ import annotations

import torch
from torch.utils.data import Subset, TensorDataset


def _to_tensor(data) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.as_tensor(data)


def dataset_to_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The arrays behind ``dataset`` as ``(X, y)`` tensors, without reading items one by one.

    For the datasets whose examples are two in-memory arrays (see
    ``_training_data._is_array_dataset``): skorch's Dataset of arrays, a
    ``TensorDataset`` of two tensors, or a ``Subset`` of either, which is
    sliced with one gather.
    """
    if isinstance(dataset, Subset):
        X, y = dataset_to_tensors(dataset.dataset)
        idx = torch.as_tensor(dataset.indices, dtype=torch.long)
        return X[idx], y[idx]
    if isinstance(dataset, TensorDataset):
        X, y = dataset.tensors
        return X, y
    return _to_tensor(dataset.X), _to_tensor(dataset.y)


def match_dtype(X: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """Cast floating inputs to the module's floating dtype.

    scikit-learn transformers emit float64 while modules are float32; casting
    here lets an estimator sit in a Pipeline after a ``StandardScaler``.
    """
    param = next(module.parameters(), None)
    if param is not None and X.is_floating_point() and X.dtype != param.dtype:
        return X.to(param.dtype)
    return X
