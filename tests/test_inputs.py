"""What users have as X and y: pandas, SciPy sparse matrices, dask arrays.

pandas and sparse inputs train, predict and score on every engine, with the
weights of the same data given as NumPy arrays; a sparse matrix is densified
a batch of rows at a time, never whole; Dask collections are refused before
any work, with what to pass instead.
"""

from __future__ import annotations

import math
import pickle
import tracemalloc

import dask.array as da
import numpy as np
import pandas as pd
import psutil
import pytest
import scipy.sparse as sp
import torch
from estimator_helpers import MLP, digits, one_torch_thread, regression, weights  # noqa: F401

from adadamp.estimators import DaskClassifier, DaskRegressor
from adadamp.examples import Examples, SparseExamples

BACKENDS = ("local", "centralized", "decentralized")
N = 256


def _estimator(kind: str, backend: str, client=None):
    common = dict(
        batch_size=64,
        max_epochs=2,
        lr=0.1,
        random_state=0,
        verbose=0,
        backend=backend,
        client=client if backend != "local" else None,
        # The module's one worker process: the examples reach it pickled in
        # the fit's payload (worker counts are the engine tests' business).
        max_workers=1,
    )
    if kind == "classifier":
        # The default validation split: a Subset of the sparse dataset is read too.
        return DaskClassifier(MLP, **common)
    return DaskRegressor(MLP, module__features=5, module__out=1, **common)


def _arrays(kind: str) -> tuple[np.ndarray, np.ndarray]:
    return digits(N) if kind == "classifier" else regression(n=N)


def _as(form: str, X: np.ndarray, y: np.ndarray):
    if form == "pandas":
        # An index that is not 0..n-1 (what a filtered frame has): rows must
        # be taken by position, not by label.
        index = np.arange(len(X)) * 3 + 100
        y_pd = pd.Series(y, index=index) if y.ndim == 1 else pd.DataFrame(y, index=index)
        return pd.DataFrame(X, index=index), y_pd
    return sp.csr_matrix(X), y


def _fit(kind: str, backend: str, X, y, client=None):
    torch.manual_seed(0)  # the same initial weights in every fit of the module
    return _estimator(kind, backend, client).fit(X, y)


@pytest.fixture(scope="module")
def references():
    """Local fits on NumPy arrays: what every other input and engine must reproduce."""
    return {kind: _fit(kind, "local", *_arrays(kind)) for kind in ("classifier", "regressor")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["pandas", "sparse"])
@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_input_trains_predicts_and_scores_like_arrays(references, dask_client, kind, form, backend):
    X, y = _arrays(kind)
    X_in, y_in = _as(form, X, y)
    est = _fit(kind, backend, X_in, y_in, dask_client)
    ref = references[kind]

    for got, want in zip(weights(est), weights(ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(est.predict(X_in), ref.predict(X), rtol=1e-5, atol=1e-6)
    assert est.score(X_in, y_in) == pytest.approx(ref.score(X, y), rel=1e-5, abs=1e-6)
    if kind == "classifier":
        proba = est.predict_proba(X_in)
        np.testing.assert_allclose(proba, ref.predict_proba(X), rtol=1e-5, atol=1e-6)
        assert proba.shape == (N, 10)
        # The validation split was scored on every epoch.
        assert len(est.history_[:, "valid_acc"]) == 2


@pytest.mark.parametrize("form", [sp.csr_array, sp.coo_matrix, sp.csc_array])
def test_every_sparse_format_trains_like_arrays(references, form):
    X, y = _arrays("classifier")
    est = _fit("classifier", "local", form(X), y)
    for got, want in zip(weights(est), weights(references["classifier"])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(est.predict(form(X)), references["classifier"].predict(X))


def test_float64_frame_is_cast_and_partial_fit_continues(references):
    X, y = _arrays("classifier")
    # What a scikit-learn transformer with pandas output hands on: float64.
    X_pd, y_pd = _as("pandas", X.astype(np.float64), y)
    est = _fit("classifier", "local", X_pd, y_pd)
    for got, want in zip(weights(est), weights(references["classifier"])):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    est.partial_fit(X_pd, y_pd)
    # Two more epochs (max_epochs) that carry on the update count.
    assert len(est.history_) == 4
    assert est.history_[-1, "model_updates"] == 2 * est.history_[1, "model_updates"]


# --------------------------------------------------------------------------- sparse rows


def test_sparse_take_densifies_only_the_rows_asked_for():
    # Dense, this matrix would take 4 TB: densifying it whole raises MemoryError.
    n = features = 10**6
    rows = np.array([3, 999_999, 3, 17])
    X = sp.csr_matrix((np.arange(1.0, 5.0), (rows, [0, 1, 2, features - 1])), shape=(n, features))
    examples = SparseExamples(X, torch.arange(n), dtype=torch.float32)

    got_X, got_y = examples.take(torch.tensor([999_999, 3, 0]))

    assert got_X.shape == (3, features) and got_X.dtype == torch.float32
    assert got_y.tolist() == [999_999, 3, 0]
    assert got_X[0, 1] == 2 and got_X[1, 0] == 1 and got_X[1, 2] == 3
    assert got_X.sum() == 6  # row 0 is empty; row 17 was not asked for
    assert len(examples) == n and isinstance(examples, Examples)
    # The Dask engines pickle the examples into their payload: it stays sparse.
    stored = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes + n * 8  # y: int64
    assert len(pickle.dumps(examples)) < stored + 10_000


def test_sparse_fit_and_predict_never_hold_the_matrix_dense():
    # 2000 x 5000 float64 is 80 MB dense; a batch of 32 rows is 1.3 MB, a
    # prediction batch of 64 rows 2.6 MB.
    n = 2000
    X = sp.random(n, 5000, density=0.002, format="csr", random_state=0)
    y = np.random.default_rng(0).integers(0, 2, size=n)
    dense_bytes = X.shape[0] * X.shape[1] * X.dtype.itemsize
    est = DaskClassifier(
        MLP,
        module__features=5000,
        module__hidden=4,
        module__out=2,
        batch_size=32,
        iterator_valid__batch_size=64,
        max_epochs=1,
        train_split=None,
        backend="local",
        verbose=0,
    )
    # A first fit imports what fitting imports (torch's optimizers load
    # torch._dynamo): modules loaded while tracing would count as allocations.
    est.fit(X[:64], y[:64]).predict(X[:64])
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        est.fit(X, y)
        predicted = est.predict(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # NumPy reports its allocations to tracemalloc (SciPy's toarray among them).
    grown = peak - before
    assert grown < dense_bytes / 8, f"{grown / 1e6:.1f} MB, {dense_bytes / 1e6:.0f} MB dense"
    assert est.history_[-1, "train_batch_count"] == math.ceil(n / 32)
    assert predicted.shape == (n,)


def test_sparse_input_with_nan_is_refused_before_training():
    X = sp.csr_matrix(np.eye(8, dtype=np.float32))
    X.data[2] = np.nan
    est = DaskClassifier(MLP, module__features=8, max_epochs=1, backend="local", verbose=0)
    with pytest.raises(ValueError, match=r"X contains 1 NaN or infinite value"):
        est.fit(X, np.zeros(8, dtype=np.int64))
    with pytest.raises(ValueError, match=r"X and y have different lengths \(8 and 7\)"):
        est.fit(sp.csr_matrix(np.eye(8)), np.zeros(7, dtype=np.int64))


# --------------------------------------------------------------------------- dask arrays


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("which", ["X", "y"])
def test_dask_array_is_refused_before_any_cluster_work(which):
    X, y = digits(64)
    data = {"X": X, "y": y}
    data[which] = da.from_array(data[which], chunks=16)
    # With no client, this backend would start a LocalCluster of its own.
    est = DaskClassifier(MLP, batch_size=16, max_epochs=1, backend="decentralized", verbose=0)
    children = _children()
    with pytest.raises(TypeError, match=rf"{which} is a Dask collection .*{which}\.compute\(\)"):
        est.fit(data["X"], data["y"])
    assert _children() == children


def test_dask_array_is_refused_by_predict():
    X, y = digits(64)
    est = DaskClassifier(
        MLP, batch_size=16, max_epochs=1, train_split=None, backend="local", verbose=0
    ).fit(X, y)
    with pytest.raises(TypeError, match=r"X is a Dask collection .*map_blocks"):
        est.predict(da.from_array(X, chunks=16))
