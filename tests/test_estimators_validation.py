"""Bad input gets a clear error naming the parameter, before any training starts."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from estimator_helpers import MLP, digits, one_torch_thread, regression  # noqa: F401
from skorch.callbacks import Callback

from adadamp.dampers import GeoDamp, PadaDamp
from adadamp.estimators import DaskClassifier, DaskRegressor


class EpochCounter(Callback):
    """Counts the epochs that began: a check raised in time leaves it at zero."""

    def initialize(self):
        self.epochs_begun = 0
        return self

    def on_epoch_begin(self, net, **kwargs):
        self.epochs_begun += 1


def classifier(**params) -> DaskClassifier:
    defaults = dict(
        module=MLP,
        max_epochs=1,
        train_split=None,
        backend="local",
        verbose=0,
        callbacks=[("counter", EpochCounter())],
    )
    return DaskClassifier(**{**defaults, **params})


def regressor(**params) -> DaskRegressor:
    defaults = dict(
        module=MLP,
        module__features=5,
        module__out=1,
        max_epochs=1,
        train_split=None,
        backend="local",
        verbose=0,
        callbacks=[("counter", EpochCounter())],
    )
    return DaskRegressor(**{**defaults, **params})


def assert_nothing_trained(est):
    counter = dict(est.callbacks_)["counter"] if hasattr(est, "callbacks_") else None
    if counter is not None:
        assert counter.epochs_begun == 0
    assert not getattr(est, "history_", [])


X, y = digits(60)
X_reg, y_reg = regression(60)


def _with(array, index, value):
    out = array.clone() if isinstance(array, torch.Tensor) else array.copy()
    out[index] = value
    return out


BAD_DATA = {
    "lengths": (classifier, X, y[:-1], ValueError, r"X and y have different lengths \(60 and 59\)"),
    "lengths-torch": (
        classifier,
        torch.from_numpy(X),
        torch.from_numpy(y[:-1]),
        ValueError,
        "X and y have different lengths",
    ),
    "empty": (
        classifier,
        np.empty((0, 64), "float32"),
        np.empty(0, "int64"),
        ValueError,
        "X is empty",
    ),
    "nan-X": (classifier, _with(X, (3, 4), np.nan), y, ValueError, r"X contains 1 NaN"),
    "inf-X": (classifier, _with(X, (5, 0), np.inf), y, ValueError, r"X contains 1 NaN or infinite"),
    "nan-X-torch": (
        classifier,
        torch.from_numpy(_with(X, (0, 0), np.nan)),
        y,
        ValueError,
        "X contains 1 NaN",
    ),
    "nan-y": (regressor, X_reg, _with(y_reg, (2, 0), np.nan), ValueError, r"y contains 1 NaN"),
    "str-X": (classifier, np.full((60, 64), "a"), y, TypeError, "X must be numeric"),
    "object-X": (classifier, X.astype(object), y, TypeError, "X must be numeric, got dtype object"),
    "ragged-X": (classifier, [[0.0, 1.0], [2.0]] * 30, y, TypeError, "X must be a rectangular"),
    "str-y": (classifier, X, np.array(["a"] * 60), TypeError, "y must be numeric"),
    # MSELoss would broadcast (n, 1) predictions against (n,) targets to n x n.
    "1d-y": (
        regressor,
        X_reg,
        y_reg.ravel(),
        ValueError,
        r"y has shape \(60,\), but the module outputs shape \(1,\) .*y.reshape\(-1, 1\)",
    ),
    "y-columns": (
        regressor,
        X_reg,
        np.hstack([y_reg, y_reg]),
        ValueError,
        r"y has shape \(60, 2\), .*outputs shape \(1,\) .*must have shape \(60, 1\)",
    ),
}


@pytest.mark.parametrize("make, X_bad, y_bad, error, match", BAD_DATA.values(), ids=BAD_DATA)
def test_bad_data(make, X_bad, y_bad, error, match):
    est = make()
    with pytest.raises(error, match=match):
        est.fit(X_bad, y_bad)
    assert_nothing_trained(est)


def test_bfloat16_input_is_checked_and_trained_on():
    X_half = torch.from_numpy(X_reg).bfloat16()
    with pytest.raises(ValueError, match="X contains 1 NaN"):
        regressor().fit(_with(X_half, (1, 1), float("nan")), y_reg)
    est = regressor().fit(X_half, y_reg)
    assert est.history_[-1]["examples"] == len(X_half)


def test_bad_data_in_partial_fit_of_a_fitted_estimator():
    est = classifier().fit(X, y)
    rows = len(est.history_)
    with pytest.raises(ValueError, match="X contains"):
        est.partial_fit(_with(X, (0, 0), np.nan), y)
    assert len(est.history_) == rows


BAD_PARAMS = {
    "batch_size=0": (dict(batch_size=0), ValueError, r"batch_size must be an int >= 1.*got 0"),
    "batch_size=-1": (dict(batch_size=-1), ValueError, r"batch_size .*got -1"),
    "batch_size=2.5": (dict(batch_size=2.5), TypeError, r"batch_size .*got 2\.5"),
    "batch_size='big'": (dict(batch_size="big"), TypeError, r"batch_size .*got 'big'"),
    "batch_size=None": (dict(batch_size=None), TypeError, r"batch_size .*got None"),
    "batch_size=True": (dict(batch_size=True), TypeError, r"batch_size .*got True"),
    "GeoDamp factor<1": (
        dict(batch_size=GeoDamp, batch_size__factor=0.5),
        ValueError,
        r"GeoDamp: factor must be .*>= 1, got 0\.5",
    ),
    "GeoDamp delay=0": (
        dict(batch_size=GeoDamp, batch_size__delay=0),
        ValueError,
        r"GeoDamp: delay must be .*> 0, got 0",
    ),
    "GeoDamp delay<0": (
        dict(batch_size=GeoDamp, batch_size__delay=-3),
        ValueError,
        r"GeoDamp: delay .*got -3",
    ),
    "GeoDamp instance": (dict(batch_size=GeoDamp(factor=0.5)), ValueError, "GeoDamp: factor"),
    "PadaDamp rate<0": (
        dict(batch_size=PadaDamp, batch_size__rate=-1),
        ValueError,
        r"PadaDamp: rate must be .*>= 0, got -1",
    ),
    "PadaDamp initial=0": (
        dict(batch_size=PadaDamp, batch_size__initial=0),
        ValueError,
        r"PadaDamp: initial must be .*> 0, got 0",
    ),
    "GeoDamp initial<0": (
        dict(batch_size=GeoDamp, batch_size__initial=-8),
        ValueError,
        r"GeoDamp: initial .*got -8",
    ),
    "unknown key": (
        dict(batch_size=GeoDamp, batch_size__dealy=3),
        ValueError,
        r"batch_size__dealy: not a parameter of GeoDamp.*batch_size__delay",
    ),
    "key for an int": (
        dict(batch_size=32, batch_size__delay=3),
        ValueError,
        r"batch_size__delay given, but batch_size=32 is an int",
    ),
    "missing dunder": (
        dict(batch_size=GeoDamp, batch_size_delay=3),
        ValueError,
        "did you mean batch_size__delay",
    ),
    "max_batch_size=0": (dict(max_batch_size=0), ValueError, r"max_batch_size must be .*got 0"),
    "max_batch_size=1.5": (dict(max_batch_size=1.5), ValueError, r"max_batch_size .*got 1\.5"),
    "backend": (dict(backend="gpu"), ValueError, r"backend must be one of .*got 'gpu'"),
    "grads_per_worker=0": (
        dict(grads_per_worker=0),
        ValueError,
        r"grads_per_worker must be an int >= 1, got 0",
    ),
    "min>max workers": (
        dict(min_workers=3, max_workers=2),
        ValueError,
        r"max_workers \(2\) is smaller than min_workers \(3\)",
    ),
    "worker_max_batch_size=0": (
        dict(worker_max_batch_size=0),
        ValueError,
        "worker_max_batch_size must be",
    ),
    "random_state": (dict(random_state="a"), TypeError, "random_state must be None or an int"),
}


@pytest.mark.parametrize("params, error, match", BAD_PARAMS.values(), ids=BAD_PARAMS)
def test_bad_params(params, error, match):
    est = classifier(**params)
    with pytest.raises(error, match=match):
        est.fit(X, y)
    assert_nothing_trained(est)


def test_bad_params_set_after_a_fit_are_caught_before_the_next_one():
    est = classifier(batch_size=GeoDamp, batch_size__initial=8).fit(X, y)
    weights = [p.detach().clone() for p in est.module_.parameters()]
    est.set_params(batch_size__factor=0.5)
    with pytest.raises(ValueError, match="factor"):
        est.partial_fit(X, y)
    assert len(est.history_) == 1
    for before, after in zip(weights, est.module_.parameters()):
        assert torch.equal(before, after)


def test_good_input_trains_and_is_counted():
    # The positive control of assert_nothing_trained: the counter does count.
    est = classifier(batch_size=np.int64(16), max_epochs=2).fit(X, y)
    assert est.history_[:, "batch_size"] == [16, 16]
    assert dict(est.callbacks_)["counter"].epochs_begun == 2


class SqueezedMLP(MLP):
    """One value per example, shape (n,): 1-D targets match it."""

    def forward(self, x):
        return super().forward(x).squeeze(-1)


def test_1d_targets_for_a_module_with_1d_output():
    est = regressor(module=SqueezedMLP, max_epochs=2, lr=0.05, batch_size=10)
    est.fit(X_reg, y_reg.ravel())
    assert est.predict(X_reg).shape == (60,)
    losses = est.history_[:, "train_loss"]
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("backend", ["local", "centralized", "decentralized"])
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_names_the_device_parameter(backend, device):
    est = classifier(device=device, backend=backend)
    with pytest.raises(
        ValueError,
        match=rf"device='{device}', but this machine has no CUDA "
        rf"device visible to PyTorch {re.escape(torch.__version__)}",
    ):
        est.fit(X, y)
    assert_nothing_trained(est)


def test_a_device_this_machine_lacks_or_that_is_no_device():
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="device='mps', but MPS is not available"):
            classifier(device="mps").fit(X, y)
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        classifier(device="gpu0").fit(X, y)
    # Set after a fit, it is checked before the next one too.
    est = classifier().fit(X, y)
    est.set_params(device="gpu0")
    with pytest.raises(ValueError, match="device='gpu0'"):
        est.partial_fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_index_out_of_range():
    count = torch.cuda.device_count()
    with pytest.raises(
        ValueError, match=rf"has {count} CUDA device\(s\), cuda:0 to cuda:{count - 1}"
    ):
        classifier(device=f"cuda:{count}").fit(X, y)


# --------------------------------------------------------------------------- max_batch_size


def test_max_batch_size_below_the_initial_batch_size_warns_once(recwarn):
    est = classifier(batch_size=GeoDamp, batch_size__initial=64, max_batch_size=16, max_epochs=2)
    with pytest.warns(
        UserWarning,
        match=r"max_batch_size=16 is below the initial batch size 64 "
        r"of GeoDamp.*divided by 4 from the first update",
    ):
        est.fit(X, y)
    assert est.history_[0, "batches"][0]["lr"] == pytest.approx(est.lr / 4)
    recwarn.clear()
    est.partial_fit(X, y)  # the same run continues: no second warning
    assert not [w for w in recwarn if "max_batch_size" in str(w.message)]
    recwarn.clear()
    classifier(batch_size=GeoDamp, batch_size__initial=16, max_batch_size=16).fit(X, y)
    assert not [w for w in recwarn if "max_batch_size" in str(w.message)]
