"""The estimators as scikit-learn sees them: clone, search, pipelines, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread  # noqa: F401
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adadamp.dampers import GeoDamp, PadaDamp
from adadamp.estimators import DaskClassifier


def classifier(**params) -> DaskClassifier:
    defaults = dict(
        lr=0.1,
        max_epochs=3,
        batch_size=GeoDamp,
        batch_size__initial=16,
        batch_size__delay=1,
        batch_size__factor=2,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    )
    return DaskClassifier(MLP, **{**defaults, **params})


def test_clone_keeps_the_damper_params():
    est = classifier(batch_size__factor=3, batch_size__delay=2)
    copy = clone(est)
    params = copy.get_params()
    assert params["batch_size"] is GeoDamp
    assert params["batch_size__factor"] == 3
    assert params["batch_size__delay"] == 2
    assert params["batch_size__initial"] == 16

    X, y = digits(200)
    copy.fit(X, y)
    assert copy.damper_.get_params() == {"initial": 16, "delay": 2, "factor": 3}
    # Epoch 3 (e = 2) is the first to grow: 16 * 3.
    assert copy.history_[:, "batch_size"] == [16, 16, 48]
    # The clone is independent: fitting it left the original unfitted.
    assert not hasattr(est, "damper_") or est.damper_ is None


def test_set_params_on_a_fitted_estimator_rebuilds_the_damper():
    X, y = digits(200)
    est = classifier(max_epochs=2).fit(X, y)
    assert est.history_[:, "batch_size"] == [16, 32]

    est.set_params(batch_size__factor=3)
    est.fit(X, y)
    assert est.history_[:, "batch_size"] == [16, 48]

    # partial_fit keeps the epoch count and continues under the new damper: e = 2.
    est.set_params(batch_size__factor=4, batch_size__initial=8)
    est.partial_fit(X, y, epochs=1)
    assert est.history_[:, "batch_size"] == [16, 48, 8 * 4**2]
    assert est.history_[-1]["epochs"] == 3

    est.set_params(batch_size=64, max_epochs=1)
    # GeoDamp's batch_size__* params do not apply to an int: a clear error, not
    # a silent choice of which to believe.
    with pytest.raises(ValueError, match="batch_size__delay"):
        est.fit(X, y)


def test_set_params_switches_from_an_int_to_a_damper_class():
    X, y = digits(200)
    est = DaskClassifier(
        MLP,
        lr=0.1,
        max_epochs=1,
        batch_size=32,
        train_split=None,
        backend="local",
        random_state=0,
        verbose=0,
    ).fit(X, y)
    assert est.history_[:, "batch_size"] == [32]
    est.set_params(batch_size=PadaDamp, batch_size__initial=10, batch_size__rate=5)
    est.fit(X, y)
    assert isinstance(est.damper_, PadaDamp)
    sizes = [u["train_batch_size"] for u in est.history_[0, "batches"]]
    assert sizes[:3] == [10, 15, 20]


def test_grid_search_over_a_damper_param():
    X, y = digits(300)
    grid = {"batch_size__factor": [1, 4]}
    search = GridSearchCV(classifier(max_epochs=3), grid, cv=2, error_score="raise")
    search.fit(X, y)
    assert search.best_params_["batch_size__factor"] in grid["batch_size__factor"]
    assert len(search.cv_results_["params"]) == 2
    best = search.best_estimator_
    assert best.damper_.factor == search.best_params_["batch_size__factor"]
    # The candidates really differed: factor 4 grows the batch, factor 1 does not.
    expected = {1: [16, 16, 16], 4: [16, 64, 256]}
    assert best.history_[:, "batch_size"] == expected[best.damper_.factor]
    assert search.score(X, y) > 0.5


def test_pipeline_after_a_float64_scaler():
    X, y = digits(400)
    X64 = X.astype("float64")
    pipe = make_pipeline(StandardScaler(), classifier(max_epochs=5, lr=0.05))
    pipe.fit(X64[:300], y[:300])
    assert pipe[-1].module_.hidden.weight.dtype == torch.float32
    proba = pipe.predict_proba(X64[300:])
    assert proba.shape == (100, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    # Chance is 0.1 on ten balanced classes.
    assert pipe.score(X64[300:], y[300:]) > 0.5


def test_pickle_round_trip_gives_identical_predictions():
    X, y = digits(200)
    est = classifier().fit(X, y)
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.predict_proba(X), est.predict_proba(X))
    assert restored.history_[:, "model_updates"] == est.history_[:, "model_updates"]
    assert restored.damper_.state_dict() == est.damper_.state_dict()


# --- with a live distributed.Client as the client parameter -------------------

_PREDICT_IN_A_FRESH_PROCESS = """
import pickle, sys
import numpy as np
sys.path.insert(0, {tests!r})
est = pickle.load(open({path!r}, "rb"))
assert est.client is None, est.client
np.save({out!r}, est.predict_proba(np.load({X!r})))
"""


def test_clone_and_grid_search_share_a_live_client(dask_client):
    est = classifier(backend="auto", client=dask_client, max_epochs=2)
    copy = clone(est)
    assert copy.client is dask_client
    assert copy.get_params()["batch_size__factor"] == 2
    X, y = digits(300)
    search = GridSearchCV(est, {"lr": [0.05, 0.1]}, cv=2, n_jobs=1, error_score="raise")
    search.fit(X, y)
    assert search.best_estimator_.client is dask_client
    # Every candidate trained on the cluster: the Dask engines name their fits.
    assert search.best_estimator_.fit_id_ is not None
    assert search.score(X, y) > 0.3
    # The original stays as it was: unfitted, its client untouched.
    assert est.client is dask_client and not getattr(est, "initialized_", False)


def test_pickle_drops_a_live_client_and_predicts_in_a_fresh_process(dask_client, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    unfitted = classifier(backend="auto", client=dask_client)
    assert pickle.loads(pickle.dumps(unfitted)).client is None
    # An address is no live object: it is kept.
    assert (
        pickle.loads(pickle.dumps(classifier(client="tcp://127.0.0.1:8786"))).client
        == "tcp://127.0.0.1:8786"
    )

    X, y = digits(200)
    est = classifier(backend="auto", client=dask_client).fit(X, y)
    assert est.fit_id_ is not None
    assert est.client is dask_client  # pickling does not change the estimator itself
    path, data, out = tmp_path / "est.pkl", tmp_path / "X.npy", tmp_path / "proba.npy"
    path.write_bytes(pickle.dumps(est))
    assert est.client is dask_client
    np.save(data, X)
    code = _PREDICT_IN_A_FRESH_PROCESS.format(
        tests=str(Path(__file__).parent), path=str(path), out=str(out), X=str(data)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(out), est.predict_proba(X), rtol=1e-6)
