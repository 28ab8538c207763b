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
    defaults = dict(lr=0.1, max_epochs=3, batch_size=GeoDamp, batch_size__initial=16,
                    batch_size__delay=1, batch_size__factor=2, train_split=None,
                    backend="local", random_state=0, verbose=0)
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
    est = DaskClassifier(MLP, lr=0.1, max_epochs=1, batch_size=32, train_split=None,
                         backend="local", random_state=0, verbose=0).fit(X, y)
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
