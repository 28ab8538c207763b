"""Checks on user input, run before any training or cluster work starts."""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

from ._checks import is_int
from ._devices import check_device
from ._inputs import plain_input
from .engines import check_backend
from .gns import LR_SCALINGS


def _as_array(data, name: str) -> np.ndarray | None:
    """A NumPy view of ``data`` for checking, or None when it is not array-like.

    A sparse matrix is checked through its stored values (``data``), which
    are what training reads.
    """
    data = plain_input(data, name)
    if sparse.issparse(data):
        return data.data
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        # NumPy has no bfloat16; float32 holds every bfloat16 value exactly.
        return (data.float() if data.dtype == torch.bfloat16 else data).numpy()
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, (list, tuple)):
        try:
            return np.asarray(data)
        except ValueError as exc:
            raise TypeError(f"{name} must be a rectangular numeric array: {exc}") from None
    return None


def check_training_data(X, y) -> None:
    """Raise a clear error for data that cannot be trained on.

    Datasets and other custom inputs are passed through: skorch handles them.
    """
    X_arr = _as_array(X, "X")
    if X_arr is None:
        return
    n = X.shape[0] if sparse.issparse(X) else len(X_arr)
    if n == 0:
        raise ValueError("X is empty: fit needs at least one example.")
    arrays = [("X", X_arr)]
    if y is not None:
        y_arr = _as_array(y, "y")
        if y_arr is not None:
            if len(y_arr) != n:
                raise ValueError(
                    f"X and y have different lengths ({n} and {len(y_arr)}): "
                    "they need one target per example."
                )
            arrays.append(("y", y_arr))
    for name, arr in arrays:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(
                f"{name} must be numeric, got dtype {arr.dtype}. "
                "Encode categories as numbers (e.g. sklearn's OrdinalEncoder) first."
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(
                f"{name} contains {bad} NaN or infinite value(s); "
                "impute or drop them (e.g. sklearn's SimpleImputer) before fit."
            )


def check_estimator_params(est) -> None:
    """Check the estimator's own parameters (the dampers check theirs)."""
    if est.max_batch_size is not None and (
        not is_int(est.max_batch_size) or est.max_batch_size < 1
    ):
        raise ValueError(f"max_batch_size must be None or an int >= 1, got {est.max_batch_size!r}.")
    for name in ("grads_per_worker", "min_workers"):
        value = getattr(est, name)
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    for name in ("max_workers", "worker_max_batch_size"):
        value = getattr(est, name)
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}.")
    if est.max_workers is not None and est.max_workers < est.min_workers:
        raise ValueError(
            f"max_workers ({est.max_workers}) is smaller than min_workers ({est.min_workers})."
        )
    check_backend(est.backend)
    check_device(est.device)
    from .cluster import validate_client  # imports distributed: only when fitting

    validate_client(est.client)  # on every backend: a typo must not train silently
    if est.lr_scaling not in LR_SCALINGS:
        raise ValueError(
            f"lr_scaling must be one of {', '.join(map(repr, LR_SCALINGS))}, "
            f"got {est.lr_scaling!r}."
        )
    if est.random_state is not None and not is_int(est.random_state):
        raise TypeError(f"random_state must be None or an int, got {est.random_state!r}.")
