"""What users pass as ``X`` and ``y``, as the estimators read it.

pandas objects become NumPy arrays (a ``DataFrame`` is one 2-D input, not
skorch's dict of columns, since the engines hand the module one tensor);
SciPy sparse matrices and arrays of any format stay sparse, as CSR, their
rows densified per batch (:class:`adadamp.examples.SparseExamples`); Dask
collections are refused, with what to pass instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import sparse
from skorch.dataset import Dataset
from torch.utils.data import Subset

from .examples import SparseExamples, cast_pair

DASK_INPUT_HELP = (
    "adadamp gathers random examples for every model update, and each update would "
    "read nearly every chunk of a chunked array. Pass {name}.compute() when it fits in "
    "memory; for data larger than memory, train on a map-style torch Dataset that "
    "opens its files lazily (such as adadamp.data.NpyDataset over .npy files), which each worker "
    "reads where it is used, and predict chunk by chunk (dask.array.map_blocks)."
)


def is_dask_collection(data: Any) -> bool:
    """A Dask array, DataFrame, bag or delayed (dask itself is not imported)."""
    return callable(getattr(type(data), "__dask_graph__", None))


def is_pandas(data: Any) -> bool:
    """A pandas ``DataFrame`` or ``Series`` (pandas itself is not imported)."""
    return hasattr(data, "iloc") and hasattr(data, "to_numpy")


def plain_input(data: Any, name: str) -> Any:
    """``data`` as the estimators read it: pandas as NumPy, sparse as CSR; Dask refused.

    Raises
    ------
    TypeError
        When ``data`` is a Dask collection (array, DataFrame, ...).
    """
    if is_dask_collection(data):
        raise TypeError(
            f"{name} is a Dask collection ({type(data).__module__}.{type(data).__name__}): "
            + DASK_INPUT_HELP.format(name=name)
        )
    if sparse.issparse(data):
        # skorch's datasets index a row as a 1 x n matrix (csr_array gives a
        # 1-D row; COO cannot be indexed): every sparse format as csr_matrix.
        return sparse.csr_matrix(data)
    if is_pandas(data):
        array = data.to_numpy()
        # pandas' copy-on-write hands out read-only views; torch warns on those.
        return array if array.flags.writeable else array.copy()
    return data


def sparse_examples(
    dataset: Any, float_dtype: torch.dtype | None, target_dtype: torch.dtype | None
) -> SparseExamples | None:
    """The training examples of a skorch dataset whose ``X`` is sparse, else None.

    Parameters
    ----------
    dataset : skorch Dataset, or a Subset of one (a validation split)
        The training set skorch built from ``X`` and ``y``.
    float_dtype, target_dtype : torch.dtype or None
        As for :func:`adadamp.examples.cast_pair`: the densified rows take
        ``float_dtype``, the targets ``target_dtype``.
    """
    indices = None
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, Dataset):
        dataset, indices = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
    if not (isinstance(dataset, Dataset) and sparse.issparse(dataset.X) and dataset.y is not None):
        return None
    X, y = dataset.X.tocsr(), torch.as_tensor(np.asarray(dataset.y))
    if indices is not None:
        # Row slicing copies only the stored entries of those rows.
        X, y = X[indices], y[torch.from_numpy(indices)]
    _, y = cast_pair(torch.zeros(0), y, float_dtype, target_dtype)
    return SparseExamples(X, y, dtype=float_dtype)
