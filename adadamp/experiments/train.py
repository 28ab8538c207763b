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
import time

import numpy as np
import torch

from ..dampers import GeoDamp
from .runtime import (
    BACKEND_CHOICES,
    DEFAULT_BACKEND,
    TestScoring,
    dask_client,
    positive_int,
    torch_threads,
    worker_limit,
)
from .schedules import FACTOR, schedule_delay

__all__ = ["add_arguments", "run"]

#: The quick job's defaults.
EPOCHS = 10
INITIAL_BATCH_SIZE = 32
LR = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``adadamp train`` options to ``parser``."""
    parser.add_argument(
        "--epochs", type=positive_int, default=EPOCHS, help=f"epochs to train (default {EPOCHS})"
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=DEFAULT_BACKEND,
        help=f"who computes the model updates (default {DEFAULT_BACKEND})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights and of the example order (default 0)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=INITIAL_BATCH_SIZE,
        help=f"initial batch size (default {INITIAL_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-workers",
        type=positive_int,
        default=None,
        help="most Dask workers (default: one per CPU core but one, at least 1)",
    )


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
