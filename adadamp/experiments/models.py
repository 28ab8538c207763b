"""Small models for the experiments, quick to train on a CPU.

Every constructor takes only ints (or ``None``), so an estimator can set them
through ``module__<name>`` parameters. The classifiers return raw logits, to
be paired with :class:`torch.nn.CrossEntropyLoss` (the default criterion of
the package's classifier), not with :class:`torch.nn.NLLLoss`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..nn import GhostBatchNorm

__all__ = ["DigitsCNN", "LinearNetwork", "MNIST1DCNN"]


class DigitsCNN(nn.Module):
    """A small 2-D CNN for the 8x8 digits of scikit-learn.

    ``conv 3x3 -> [GhostBatchNorm] -> ReLU -> max-pool 2 -> linear -> ReLU ->
    linear``, mapping images ``(N, 1, 8, 8)`` to 10 logits ``(N, 10)``.

    Parameters
    ----------
    channels : int, default=16
        Number of convolution filters.
    hidden : int, default=64
        Width of the hidden fully connected layer.
    ghost_batch_size : int or None, default=None
        When set, a :class:`~adadamp.nn.GhostBatchNorm` with this virtual
        batch size follows the convolution, as in the Smith et al.
        reproduction; when ``None`` there is no normalization.
    """

    def __init__(
        self, channels: int = 16, hidden: int = 64, ghost_batch_size: int | None = None
    ) -> None:
        super().__init__()
        channels = _check_positive_int("channels", channels)
        hidden = _check_positive_int("hidden", hidden)
        # The normalization subtracts a per-channel mean, which cancels a
        # convolution bias, so the bias is dropped when it would be wasted.
        self.conv = nn.Conv2d(1, channels, kernel_size=3, padding=1, bias=ghost_batch_size is None)
        self.norm = _optional_ghost_norm(channels, ghost_batch_size)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.norm(self.conv(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class MNIST1DCNN(nn.Module):
    """A small 1-D CNN for the length-40 signals of MNIST-1D.

    Three convolutions (the last two with stride 2, so 40 -> 20 -> 10
    positions) with ReLUs, then one linear layer, mapping signals
    ``(N, 1, 40)`` to 10 logits ``(N, 10)``.

    Parameters
    ----------
    channels : int, default=32
        Number of filters of every convolution.
    ghost_batch_size : int or None, default=None
        When set, a :class:`~adadamp.nn.GhostBatchNorm` with this virtual
        batch size follows the first convolution.
    """

    def __init__(self, channels: int = 32, ghost_batch_size: int | None = None) -> None:
        super().__init__()
        channels = _check_positive_int("channels", channels)
        self.conv1 = nn.Conv1d(1, channels, kernel_size=5, padding=2, bias=ghost_batch_size is None)
        self.norm = _optional_ghost_norm(channels, ghost_batch_size)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class LinearNetwork(nn.Module):
    """A three-layer linear network, ``y = w3^T W2 W1 x``, for synthetic regression.

    It has no activations and no biases, so it computes a linear function of
    its input, yet its loss is not convex in its weights: the setting of the
    synthetic experiment.

    Parameters
    ----------
    d : int
        Number of input features.
    hidden : int or None, default=None
        Width of both hidden layers; ``None`` means ``d``.

    Notes
    -----
    ``fc1`` holds ``W1`` (``hidden x d``), ``fc2`` holds ``W2``
    (``hidden x hidden``) and ``fc3`` holds ``w3^T`` (``1 x hidden``). The
    output has shape ``(N, 1)``, the shape of the targets from
    :func:`adadamp.experiments.data.make_linear_network_data`.
    """

    def __init__(self, d: int, hidden: int | None = None) -> None:
        super().__init__()
        d = _check_positive_int("d", d)
        hidden = d if hidden is None else _check_positive_int("hidden", hidden)
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.fc1(x)))


def _optional_ghost_norm(channels: int, ghost_batch_size: int | None) -> nn.Module:
    """GhostBatchNorm over ``channels`` when a virtual batch size is given, else a no-op."""
    if ghost_batch_size is None:
        return nn.Identity()
    return GhostBatchNorm(channels, virtual_batch_size=ghost_batch_size)


def _check_positive_int(name: str, value: object) -> int:
    # numbers.Integral admits NumPy integers, which parameter grids often hold.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    return int(value)
