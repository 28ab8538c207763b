import random
import socket
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from adadamp.experiments.data import (
    DATASETS,
    least_squares_test_loss,
    load_digits_dataset,
    load_mnist1d_dataset,
    make_linear_network_data,
)
from adadamp.experiments.models import MNIST1DCNN, DigitsCNN, LinearNetwork
from adadamp.nn import GhostBatchNorm

N_MNIST1D = 300  # small, so generating it takes a fraction of a second


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(seed=0)


@pytest.fixture(scope="module")
def mnist1d():
    return load_mnist1d_dataset(seed=0, n_samples=N_MNIST1D)


def _rows(X: torch.Tensor) -> Counter:
    return Counter(row.tobytes() for row in X.reshape(len(X), -1).numpy())


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# --- digits ---------------------------------------------------------------


def test_digits_shapes_dtypes_ranges(digits):
    X_train, X_test, y_train, y_test = digits
    assert X_train.shape == (1437, 1, 8, 8) and X_test.shape == (360, 1, 8, 8)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert X_train.dtype == X_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    for X in (X_train, X_test):
        assert X.min() == 0.0 and X.max() == 1.0
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))


def test_digits_split_is_a_stratified_partition(digits):
    X_train, X_test, y_train, y_test = digits
    full = load_digits()
    X_all = torch.from_numpy((full.data / 16.0).astype(np.float32))
    # Every example lands in exactly one part (compared as multisets of rows,
    # since the digits contain a few duplicate images).
    assert _rows(X_train) + _rows(X_test) == _rows(X_all)
    # Stratified: each class's share of the test set matches its share overall.
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 360 / 1797) <= 1)


def test_digits_determinism_by_seed(digits):
    _assert_same(load_digits_dataset(seed=0), digits)
    other = load_digits_dataset(seed=1)
    assert not torch.equal(other[0], digits[0])


def test_digits_bad_test_size():
    with pytest.raises(ValueError, match="test_size"):
        load_digits_dataset(test_size=1.5)


# --- MNIST-1D ---------------------------------------------------------------


def test_mnist1d_shapes_dtypes_standardized(mnist1d):
    X_train, X_test, y_train, y_test = mnist1d
    assert X_train.shape == (240, 1, 40) and X_test.shape == (60, 1, 40)
    assert y_train.shape == (240,) and y_test.shape == (60,)
    assert X_train.dtype == X_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert y_train.min() >= 0 and y_train.max() <= 9
    assert set(y_train.tolist()) == set(range(10))
    # Standardized per position with the training statistics.
    torch.testing.assert_close(X_train.mean(dim=0), torch.zeros(1, 40), atol=1e-5, rtol=0)
    std = X_train.std(dim=0, unbiased=False)
    torch.testing.assert_close(std, torch.ones(1, 40), atol=1e-4, rtol=0)
    assert torch.isfinite(X_test).all()
    assert X_test.mean().abs() < 0.5  # test statistics are close, not equal


def test_mnist1d_train_and_test_do_not_overlap(mnist1d):
    X_train, X_test, _, _ = mnist1d
    assert not set(_rows(X_train)) & set(_rows(X_test))


def test_mnist1d_determinism_by_seed(mnist1d):
    _assert_same(load_mnist1d_dataset(seed=0, n_samples=N_MNIST1D), mnist1d)
    other = load_mnist1d_dataset(seed=1, n_samples=N_MNIST1D)
    assert not torch.equal(other[0], mnist1d[0])


def test_mnist1d_is_generated_offline(monkeypatch, tmp_path):
    import mnist1d.data
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("the MNIST-1D loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(mnist1d.data, "get_dataset", refuse)
    monkeypatch.setattr(mnist1d.data, "requests", None)  # any use would fail
    monkeypatch.chdir(tmp_path)  # the downloading path caches a pickle in the cwd

    X_train, X_test, y_train, y_test = load_mnist1d_dataset(seed=3, n_samples=100)
    assert len(X_train) + len(X_test) == 100
    assert list(tmp_path.iterdir()) == []


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state(), random.getstate()
    load_mnist1d_dataset(seed=0, n_samples=40)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


@pytest.mark.parametrize("kwargs", [{"n_samples": 10}, {"test_size": 0.0}])
def test_mnist1d_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        load_mnist1d_dataset(**kwargs)


def test_datasets_registry(digits):
    assert set(DATASETS) == {"digits", "mnist1d"}
    assert DATASETS["digits"] is load_digits_dataset
    assert DATASETS["mnist1d"] is load_mnist1d_dataset
    _assert_same(DATASETS["digits"](seed=0), digits)


# --- synthetic linear-network data ------------------------------------------------


def test_linear_network_data_shapes_and_determinism():
    data = make_linear_network_data(n_train=500, n_test=200, d=20, noise=0.5, seed=0)
    X_train, X_test, y_train, y_test = data
    assert X_train.shape == (500, 20) and X_test.shape == (200, 20)
    assert y_train.shape == (500, 1) and y_test.shape == (200, 1)
    assert all(t.dtype == torch.float32 for t in data)
    _assert_same(make_linear_network_data(n_train=500, n_test=200, d=20, noise=0.5, seed=0), data)
    assert not torch.equal(
        make_linear_network_data(n_train=500, n_test=200, d=20, noise=0.5, seed=1)[0], X_train
    )
    # The training set does not depend on the size of the test set.
    _assert_same(
        make_linear_network_data(n_train=500, n_test=50, d=20, noise=0.5, seed=0)[::2],
        data[::2],
    )
    assert not set(_rows(X_train)) & set(_rows(X_test))


def test_least_squares_test_loss_beats_the_mean_and_matches_the_noise():
    noise = 0.5
    X_train, X_test, y_train, y_test = make_linear_network_data(
        n_train=2000, n_test=1000, d=20, noise=noise, seed=0
    )
    loss = least_squares_test_loss(X_train, y_train, X_test, y_test)
    mean_loss = float(((y_test - y_train.mean()) ** 2).mean())
    assert loss < mean_loss / 10
    # With n >> d the fitted weights are close to the true ones, so the test
    # loss is about the noise variance.
    assert 0.8 * noise**2 < loss < 1.2 * noise**2
    # 1-D targets give the same answer.
    flat = least_squares_test_loss(X_train, y_train[:, 0], X_test, y_test[:, 0])
    assert flat == pytest.approx(loss)


def test_least_squares_test_loss_without_noise_is_zero():
    X_train, X_test, y_train, y_test = make_linear_network_data(
        n_train=200, n_test=100, d=10, noise=0.0, seed=0
    )
    assert least_squares_test_loss(X_train, y_train, X_test, y_test) < 1e-8


# --- models -----------------------------------------------------------------------


@pytest.mark.parametrize("ghost_batch_size", [None, 8])
def test_digits_cnn(digits, ghost_batch_size):
    X, y = digits[0][:40], digits[2][:40]
    model = DigitsCNN(channels=4, hidden=16, ghost_batch_size=ghost_batch_size)
    has_gbn = any(isinstance(m, GhostBatchNorm) for m in model.modules())
    assert has_gbn == (ghost_batch_size is not None)
    out = model(X)
    assert out.shape == (40, 10)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(X[:1]).shape == (1, 10)


@pytest.mark.parametrize("ghost_batch_size", [None, 8])
def test_mnist1d_cnn(mnist1d, ghost_batch_size):
    X, y = mnist1d[0][:40], mnist1d[2][:40]
    model = MNIST1DCNN(channels=8, ghost_batch_size=ghost_batch_size)
    out = model(X)
    assert out.shape == (40, 10)
    F.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(X[:1]).shape == (1, 10)


def test_linear_network():
    X_train, _, y_train, _ = make_linear_network_data(n_train=32, n_test=8, d=12, seed=0)
    model = LinearNetwork(12)
    out = model(X_train)
    assert out.shape == (32, 1)
    F.mse_loss(out, y_train).backward()
    assert [tuple(p.shape) for p in model.parameters()] == [(12, 12), (12, 12), (1, 12)]
    assert [tuple(p.shape) for p in LinearNetwork(12, hidden=5).parameters()] == [
        (5, 12),
        (5, 5),
        (1, 5),
    ]
    # No activations and no biases: the network is a linear map.
    with torch.no_grad():
        a, b = X_train[:1], X_train[1:2]
        torch.testing.assert_close(model(2 * a - b), 2 * model(a) - model(b))


@pytest.mark.parametrize(
    "build",
    [
        lambda: DigitsCNN(channels=0),
        lambda: DigitsCNN(ghost_batch_size=0),
        lambda: MNIST1DCNN(channels=-1),
        lambda: MNIST1DCNN(ghost_batch_size=0),
        lambda: LinearNetwork(0),
        lambda: LinearNetwork(4, hidden=0),
    ],
)
def test_models_reject_bad_sizes(build):
    with pytest.raises(ValueError):
        build()


def test_models_accept_numpy_ints():
    model = DigitsCNN(channels=np.int64(4), hidden=np.int64(8), ghost_batch_size=np.int64(4))
    assert model(torch.zeros(8, 1, 8, 8)).shape == (8, 10)
