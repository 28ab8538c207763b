"""Training data with fresh augmentation: random shifts, drawn every time an example is read.

``adadamp compare --augment`` trains on :class:`RandomShift` of its training
images and evaluates on the test images as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["AUGMENT_SHIFT", "RandomShift"]

#: The largest shift of ``adadamp compare --augment``, in pixels per axis: one
#: pixel of an 8x8 digit is already an eighth of its width.
AUGMENT_SHIFT = 1


class RandomShift(Dataset):
    """Examples shifted by a random offset along every spatial axis, zero-padded.

    Each ``dataset[i]`` draws, with torch's random number generator, one
    offset in ``-max_shift..max_shift`` per spatial axis (the axes after the
    channel axis: height and width of an image, length of a signal), so an
    example differs from one read to the next. Pixels shifted out are lost,
    pixels shifted in are zero. Seed torch (``torch.manual_seed``) to repeat
    the draws.

    Parameters
    ----------
    X : torch.Tensor
        Inputs shaped ``(N, C, *spatial)`` with at least one spatial axis.
    y : torch.Tensor
        Labels, one per example; returned unchanged.
    max_shift : int, default=AUGMENT_SHIFT
        Largest shift, in pixels, along each spatial axis.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, max_shift: int = AUGMENT_SHIFT) -> None:
        if X.dim() < 3:
            raise ValueError(
                f"X must have shape (N, C, *spatial) with a spatial axis, got {tuple(X.shape)}."
            )
        if len(X) != len(y):
            raise ValueError(f"X and y have different lengths ({len(X)} and {len(y)}).")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}.")
        self.X, self.y, self.max_shift = X, y, max_shift

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, s = self.X[i], self.max_shift
        spatial = x.dim() - 1
        # Where the window of x's size starts in the padded x: s is no shift.
        starts = torch.randint(0, 2 * s + 1, (spatial,)).tolist()
        padded = F.pad(x, [s] * (2 * spatial))
        window = (slice(None),) + tuple(
            slice(start, start + size) for start, size in zip(starts, x.shape[1:])
        )
        return padded[window], self.y[i]
