"""Small models, data and fixtures shared by the ``test_estimators_*`` files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_regression
from torch import nn


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run torch on one thread while a test module runs.

    The models here are tiny: with two intra-op threads on two busy cores,
    thread hand-offs cost more than the arithmetic (about ten times slower).
    Module-scoped so that module-scoped fixtures (reference runs) use the same
    thread count as the tests comparing with them: the reduction order, and so
    the last bits of every loss, depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MLP(nn.Module):
    """One hidden layer; logits out (classification) or one value (regression)."""

    def __init__(self, features: int = 64, hidden: int = 32, out: int = 10):
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """load_digits scaled to [0, 1] as float32, labels int64; the first ``n`` examples."""
    X, y = load_digits(return_X_y=True)
    X, y = (X / 16).astype("float32"), y.astype("int64")
    return (X, y) if n is None else (X[:n], y[:n])


def regression(n: int = 100, features: int = 5, seed: int = 0):
    """make_regression as float32, targets shaped (n, 1) as skorch regressors want."""
    X, y = make_regression(n_samples=n, n_features=features, noise=1.0, random_state=seed)
    return X.astype("float32"), (y / 100).astype("float32").reshape(-1, 1)


def updates(est, key: str) -> list:
    """One value per model update, over every epoch of ``est.history_``."""
    return [batch[key] for epoch in est.history_ for batch in epoch["batches"]]


def weights(est) -> list[torch.Tensor]:
    return [p.detach().clone() for p in est.module_.parameters()]


def wait_until_workers_hold_model(client, fit_id: str, n_workers: int, timeout: float = 60):
    """Block until ``n_workers`` workers have built the fit's model (their warm-up finished).

    A worker that joins mid-fit is used once it holds the model; a test that
    checks *when* it is used first waits for that here, so that the check
    does not depend on how long the worker takes to import torch.
    """
    import time

    def finished_warm_ups(dask_scheduler, prefix):
        return sum(
            str(key).startswith(prefix) and task.state == "memory"
            for key, task in dask_scheduler.tasks.items()
        )

    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(finished_warm_ups, prefix=f"adadamp-warm-{fit_id}") < n_workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n_workers} workers did not hold the model within {timeout} s")
        time.sleep(0.1)
    time.sleep(0.2)  # the fit's client hears of it a moment after the scheduler
