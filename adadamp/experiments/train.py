"""``adadamp train``: a short training run that shows what the estimator records.

A small CNN learns scikit-learn's 8x8 digits while ``GeoDamp`` grows the batch
size by 5 every ``delay`` epochs. skorch prints one row per epoch (batch
size, learning rate, model updates, workers, training loss, test accuracy),
then the final test accuracy is printed. On 2 cores it takes about half a
minute on the default embedded Dask cluster (mostly starting it and adding a
worker), a few seconds with ``--backend local``.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from skorch.callbacks import Callback

from ..dampers import GeoDamp
from ..engines import BACKENDS
from .schedules import FACTOR, schedule_delay

__all__ = [
    "BACKEND_CHOICES",
    "DEFAULT_BACKEND",
    "TestScoring",
    "add_arguments",
    "dask_client",
    "run",
    "torch_threads",
    "worker_limit",
]

#: The backend the experiment commands use unless ``--backend`` says otherwise:
#: an embedded Dask cluster whose workers grow with the batch size.
DEFAULT_BACKEND = "decentralized"

#: ``"auto"`` is left out: an experiment should say what it ran on.
BACKEND_CHOICES = tuple(b for b in BACKENDS if b != "auto")

#: The quick job's defaults.
EPOCHS = 10
INITIAL_BATCH_SIZE = 32
LR = 0.1


class TestScoring(Callback):
    """Record the loss and accuracy on a held-out set after every epoch.

    Writes ``test_loss`` and ``test_acc`` into the epoch's row of
    ``net.history_``, so skorch's printed table shows them. A callback, not
    a validation split, so that the held-out set is the same fixed test set
    for every run and never takes examples from the training set.

    Parameters
    ----------
    X, y : torch.Tensor
        The held-out examples and their labels.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X = X
        self.y = y

    def on_epoch_end(self, net: Any, **kwargs: Any) -> None:
        # forward(training=False) puts the module in eval mode (ghost batch
        # norm then uses its running statistics, as at prediction time).
        logits = net.forward(self.X, training=False)
        target = torch.as_tensor(self.y).to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target.long())
        acc = (logits.argmax(dim=1) == target).double().mean()
        net.history.record("test_loss", float(loss))
        net.history.record("test_acc", float(acc))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in this process, then restore.

    The experiment models are so small that a thread pool costs more than it
    gains: one thread is several times faster than two on a 2-core machine
    that also runs other processes.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_limit(backend: str, max_workers: int | None) -> int | None:
    """The estimator's ``max_workers`` for an experiment on ``backend``.

    The schedules ask for up to ``final batch / initial batch`` workers (90
    for Inc. BS on the digits); on a machine's own cluster more worker
    processes than cores only compete for them, so a Dask backend is capped
    at the cores unless ``max_workers`` says otherwise.
    """
    if max_workers is not None or backend == "local":
        return max_workers
    from ..cluster import cpu_count

    return cpu_count()


@contextlib.contextmanager
def dask_client(backend: str, max_workers: int | None = None) -> Iterator[Any]:
    """A Dask client for the whole experiment, or ``None`` for ``backend="local"``.

    One cluster serves every run of an experiment: starting one per fit would
    add its start-up time to every run.
    """
    if backend == "local":
        yield None
        return
    from ..cluster import cluster_client

    with cluster_client(None, max_workers=worker_limit(backend, max_workers)) as handle:
        # Current for the experiment, so that Dask calls that look up the
        # client themselves (distributed.wait, futures) find this one.
        with handle.client.as_current():
            yield handle.client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``adadamp train`` options to ``parser``."""
    parser.add_argument("--epochs", type=_positive_int, default=EPOCHS,
                        help=f"epochs to train (default {EPOCHS})")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default=DEFAULT_BACKEND,
                        help=f"who computes the model updates (default {DEFAULT_BACKEND})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and of the example order (default 0)")
    parser.add_argument("--batch-size", type=_positive_int, default=INITIAL_BATCH_SIZE,
                        help=f"initial batch size (default {INITIAL_BATCH_SIZE})")
    parser.add_argument("--max-workers", type=_positive_int, default=None,
                        help="most Dask workers (default: the CPU cores)")


def run(args: argparse.Namespace) -> int:
    """Train the quick job and print the per-epoch table and the test accuracy."""
    from ..estimators import DaskClassifier
    from .data import load_digits_dataset
    from .models import DigitsCNN

    X_train, X_test, y_train, y_test = load_digits_dataset(seed=0)
    delay = schedule_delay(args.epochs)
    print(
        f"digits: {len(X_train)} training and {len(X_test)} test images; "
        f"GeoDamp(initial={args.batch_size}, delay={delay}, factor={FACTOR}), "
        f"backend={args.backend}"
    )
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    with torch_threads(1), dask_client(args.backend, args.max_workers) as client:
        net = DaskClassifier(
            DigitsCNN,
            batch_size=GeoDamp,
            batch_size__initial=args.batch_size,
            batch_size__delay=delay,
            batch_size__factor=FACTOR,
            grads_per_worker=args.batch_size,
            max_workers=worker_limit(args.backend, args.max_workers),
            optimizer=torch.optim.SGD,
            optimizer__momentum=0.9,
            optimizer__nesterov=True,
            optimizer__weight_decay=5e-4,
            lr=LR,
            max_epochs=args.epochs,
            train_split=None,
            callbacks=[("test", TestScoring(X_test, y_test))],
            backend=args.backend,
            client=client,
            random_state=args.seed,
        )
        net.fit(X_train, y_train)
        accuracy = float(np.mean(net.predict(X_test) == y_test.numpy()))
    seconds = time.perf_counter() - began
    print(
        f"test accuracy: {accuracy:.2%} after {net.history[-1, 'model_updates']} model updates "
        f"({seconds:.1f} s)"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value
