"""RandomShift, the augmentation of ``adadamp compare --augment``: drawn per read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from adadamp.experiments.augment import RandomShift
from adadamp.experiments.compare import CompareConfig, _load


def shifted(x: np.ndarray, offsets: tuple[int, ...]) -> np.ndarray:
    """``x`` (channels first) moved by ``offsets`` along its spatial axes, zeros shifted in."""
    out = np.zeros_like(x)
    src = [slice(None)]
    dst = [slice(None)]
    for d, size in zip(offsets, x.shape[1:]):
        src.append(slice(max(-d, 0), size - max(d, 0)))
        dst.append(slice(max(d, 0), size - max(-d, 0)))
    out[tuple(dst)] = x[tuple(src)]
    return out


def _images(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    # No zero pixels: a shift always changes the image, and every shift differs.
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen) + 0.5, torch.arange(n) + 3


def _which_shift(out: np.ndarray, x: np.ndarray, max_shift: int, axes: int) -> tuple[int, ...]:
    grid = np.stack(
        np.meshgrid(*[np.arange(-max_shift, max_shift + 1)] * axes, indexing="ij"), -1
    ).reshape(-1, axes)
    matches = [tuple(o) for o in grid if np.array_equal(out, shifted(x, tuple(o)))]
    assert len(matches) == 1, f"not a shift of at most {max_shift}: {matches}"
    return matches[0]


@pytest.mark.parametrize("max_shift", [1, 2])
def test_every_read_is_a_bounded_shift_and_all_shifts_are_drawn(max_shift):
    X, y = _images()
    data = RandomShift(X, y, max_shift=max_shift)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60 * (2 * max_shift + 1) ** 2):
        image, label = data[2]
        assert image.shape == X[2].shape and image.dtype == X.dtype
        assert label == y[2]
        seen.add(_which_shift(image.numpy(), X[2].numpy(), max_shift, axes=2))
    # Each of the (2s+1)^2 offsets drawn: reads of the same index differ.
    assert len(seen) == (2 * max_shift + 1) ** 2
    # The data set itself is left as it was.
    assert torch.equal(data.X, X)


def test_signals_shift_along_their_one_axis():
    X = torch.rand(3, 1, 40) + 0.5
    data = RandomShift(X, torch.zeros(3), max_shift=1)
    seen = {_which_shift(data[0][0].numpy(), X[0].numpy(), 1, axes=1) for _ in range(100)}
    assert seen == {(-1,), (0,), (1,)}


def test_draws_follow_torchs_seed_and_are_fresh_per_epoch_through_a_dataloader():
    X, y = _images(n=64)
    data = RandomShift(X, y)

    def epoch() -> torch.Tensor:
        return torch.cat([xb for xb, _ in DataLoader(data, batch_size=16)])

    torch.manual_seed(1)
    first, second = epoch(), epoch()
    torch.manual_seed(1)
    again = epoch()
    assert torch.equal(first, again)
    # A second pass over the same examples draws new shifts for most of them.
    changed = (first != second).flatten(1).any(1).float().mean()
    assert changed > 0.7
    labels = torch.cat([yb for _, yb in DataLoader(data, batch_size=16)])
    assert torch.equal(labels, y)


def test_zero_shift_is_the_identity():
    X, y = _images()
    data = RandomShift(X, y, max_shift=0)
    assert all(torch.equal(data[i][0], X[i]) for i in range(len(X)))


@pytest.mark.parametrize(
    "X, y, max_shift, match",
    [
        (torch.zeros(4, 8), torch.zeros(4), 1, r"shape \(N, C, \*spatial\)"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(3), 1, r"different lengths \(4 and 3\)"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4), -1, r"max_shift must be an int >= 0"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4), 1.5, r"max_shift must be an int >= 0"),
    ],
)
def test_bad_arguments(X, y, max_shift, match):
    with pytest.raises(ValueError, match=match):
        RandomShift(X, y, max_shift=max_shift)


def test_compare_augments_the_training_set_only():
    plain = _load(CompareConfig(n_train=100))
    train, X_test, y_train, y_test = _load(CompareConfig(n_train=100, augment=True))
    assert isinstance(train, RandomShift) and y_train is None
    assert torch.equal(train.X, plain[0]) and torch.equal(train.y, plain[2])
    # The test set is the same, unshifted.
    assert torch.equal(X_test, plain[1]) and torch.equal(y_test, plain[3])
