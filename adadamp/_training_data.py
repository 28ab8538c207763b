"""Which :class:`~adadamp.examples.Examples` a fit trains on, and checks of a dataset.

:func:`training_examples` is the one place that decides how a kind of
training data is held: arrays and tensors as in-memory tensors (one gather
per update), any other map-style ``torch.utils.data.Dataset`` as a dataset
read at every use (:class:`~adadamp.examples.DatasetExamples`), a sparse
matrix as rows densified per update (:class:`~adadamp.examples.SparseExamples`). A new kind
of input is one more branch here.
"""

from __future__ import annotations

from typing import Any

import torch
from skorch.dataset import Dataset as SkorchDataset
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from ._inputs import sparse_examples
from ._tensors import dataset_to_tensors
from .examples import DatasetExamples, Examples, TensorExamples, cast_pair, seeded_item


def _is_array_dataset(dataset) -> bool:
    """Whether ``dataset`` is skorch's Dataset of arrays (or a Subset of one): the fast path."""
    if isinstance(dataset, Subset):
        return _is_array_dataset(dataset.dataset)
    if type(dataset) is TensorDataset:  # a subclass may transform its items
        return len(dataset.tensors) == 2
    return (
        isinstance(dataset, SkorchDataset)
        and type(dataset).__getitem__ is SkorchDataset.__getitem__
        and dataset.y is not None
        and not isinstance(dataset.X, dict)
    )


def check_dataset(X: Any) -> None:
    """Raise a clear error for a dataset given to ``fit`` that cannot be trained on.

    Only torch datasets are checked (arrays are checked by
    :func:`adadamp._validation.check_training_data`): one must be map-style,
    non-empty, and give ``(x, y)`` pairs. Reads ``X[0]`` once.
    """
    if isinstance(X, IterableDataset):
        raise TypeError(
            f"X is an IterableDataset ({type(X).__name__}): every epoch reads the training "
            "set in the order of a permutation, which needs indexing. Use a map-style "
            "torch.utils.data.Dataset (__len__ and __getitem__)."
        )
    if not isinstance(X, Dataset) or _is_array_dataset(X):
        return
    try:
        n = len(X)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"X ({type(X).__name__}) has no len(): a map-style dataset needs __len__."
        ) from None
    if n == 0:
        raise ValueError(f"X ({type(X).__name__}) has length 0: fit needs at least one example.")
    # Read with the generators restored after, so that checking draws nothing from them.
    item = seeded_item(X, 0, 0)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = f"a {type(item).__name__}" + (
            f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
        )
        raise TypeError(
            f"X[0] is {kind}, not an (x, y) pair: a dataset given to fit must return "
            "(input, target) from __getitem__ (for a dataset of inputs only, pass the "
            "targets as y to a TensorDataset or use arrays)."
        )


def training_examples(
    dataset: Dataset,
    *,
    seed: int | None,
    float_dtype: torch.dtype | None,
    target_dtype: torch.dtype | None,
    loader_params: dict[str, Any] | None = None,
) -> Examples:
    """The Examples an engine trains on for the training ``dataset`` of a fit.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        What skorch's ``get_split_datasets`` returned for training (skorch's
        Dataset of arrays, a ``Subset`` of the user's dataset, ...).
    seed : int or None
        Seeds the draws of a dataset's transforms per (epoch, example); None: not seeded.
    float_dtype, target_dtype : torch.dtype or None
        The module's floating dtype, and the targets' dtype (None: floating
        targets take ``float_dtype``).
    loader_params : dict or None
        ``DataLoader`` keywords for a dataset read at every use (``iterator_train__*``).
    """
    sparse = sparse_examples(dataset, float_dtype, target_dtype)
    if sparse is not None:
        return sparse
    if _is_array_dataset(dataset):
        X, y = cast_pair(*dataset_to_tensors(dataset), float_dtype, target_dtype)
        return TensorExamples(X, y)
    return DatasetExamples(dataset, seed, float_dtype, target_dtype, loader_params)
