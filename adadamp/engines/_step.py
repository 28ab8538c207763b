"""The gradient and update routine that every engine shares.

A model update over ``B`` examples split into ``P`` slices is: each worker adds
its slice's share of the batch's mean gradient, the per-example gradients summed
over its slice and divided by ``B`` (:func:`accumulate_gradient`), the shares
are added over workers, and one optimizer step is taken (:func:`apply_update`).
Because workers add shares of one mean rather than averaging their own means,
the result does not depend on ``P``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .. import gns
from ..exceptions import ConvergenceError

# Examples per forward pass when only evaluating the loss (no gradients kept).
EVAL_CHUNK = 1024


def split_slices(batch_size: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ``(start, stop)`` slices covering ``range(batch_size)``.

    Sizes differ by at most one; with more workers than examples, the extra
    workers get empty slices.
    """
    bounds = [batch_size * r // workers for r in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def accumulate_gradient(
    module: nn.Module,
    criterion: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    micro_batch: int | None = None,
    on_piece: Callable[[int, bool], None] | None = None,
) -> float:
    """Add ``X, y``'s share of a ``batch_size`` batch's mean gradient into ``p.grad``.

    The share is the sum of per-example gradients over ``X, y`` divided by
    ``batch_size``. Works in micro-batches of at most ``micro_batch``
    examples so memory stays bounded whatever the slice size. ``criterion``
    must average over its batch (PyTorch's default ``reduction='mean'``).
    ``on_piece``, if given, is called with each micro-batch's size right
    after its backward pass (see :class:`PieceNorms`). Returns the summed
    loss over the examples.
    """
    n = len(X)
    step = n if not micro_batch else micro_batch
    loss_sum = 0.0
    for start in range(0, n, max(step, 1)):
        xb, yb = X[start : start + step], y[start : start + step]
        size = len(xb)
        mean = criterion(module(xb), yb)
        # Scaling the scalar loss costs nothing; dividing the gradients
        # afterwards was a pass over all of them (3% of a small model's update).
        (mean if size == batch_size else mean * (size / batch_size)).backward()
        loss_sum += float(mean.detach()) * size
        if on_piece is not None:
            on_piece(size, start + step >= n)
    return loss_sum


class PieceNorms:
    """``sum_i |s_i|^2 / b_i`` over the pieces of a gradient built piece by piece.

    A piece is one micro-batch of :func:`accumulate_gradient`, ``b_i`` its
    size and ``s_i`` its gradient sum: ``batch_size`` times the change it
    made to the gradients, which hold shares of a ``batch_size`` batch's
    mean. The gradients are read through ``tensors`` (called anew per piece:
    ``p.grad`` may only be allocated by the first backward pass) and must be
    zero when the first piece starts. With ``g_i`` the gradients after piece
    ``i``, the change is ``g_i - g_(i-1)``: the copy of ``g_(i-1)`` kept for it
    becomes its negative in place, then ``g_i`` for the next piece (no copy after
    the last), nothing per example. Subtracting before the norm is exact
    where expanding ``|g_i - g_(i-1)|^2`` into dot products cancels, and
    takes two fused operators where a dot product per tensor took one call
    each (about 170 to 110 µs for two pieces of benchmarks' small MLP).
    """

    def __init__(self, tensors: Callable[[], Sequence[torch.Tensor]], batch_size: int):
        self.tensors = tensors
        self.batch_sq = float(batch_size) ** 2
        self.previous: list[torch.Tensor] | None = None  # g_(i-1); None: all zeros
        self.count = 0
        self.sq_sum: torch.Tensor | float = 0.0

    def __call__(self, size: int, last: bool = False) -> None:
        now = [t.detach().reshape(-1) for t in self.tensors()]
        if self.previous is None:
            piece_sq = squared_norm_sum(now)
            if not last:
                self.previous = [t.clone() for t in now]
        else:
            torch._foreach_sub_(self.previous, now)  # now -s_i / batch_size
            piece_sq = squared_norm_sum(self.previous)
            if not last:
                torch._foreach_copy_(self.previous, now)
        # Kept as a tensor: no device sync per piece.
        self.sq_sum = self.sq_sum + piece_sq * (self.batch_sq / size)
        self.count += 1

    def result(self) -> tuple[float, int]:
        """``(sum_i |s_i|^2 / b_i, number of pieces)``."""
        return float(self.sq_sum), self.count


# A lone rank whose slice is one micro-batch splits it in two to estimate the
# gradient statistics: a second backward pass over half the examples, 15 to
# 50% of an update in benchmarks/gns.py. It splits on every this-many-th
# update only (the moving averages weigh each estimate for as many updates).
SPLIT_EVERY = 10


def splits_for_stats(micro_batch: int | None, n: int, alone: bool) -> bool:
    """Whether a slice of ``n`` examples has only one piece unless split for the statistics.

    The pieces are the small batches the noise scale is estimated from
    (:mod:`adadamp.gns`). A rank that holds the whole batch (``alone``) in
    one micro-batch would have a single piece, and so no estimate.
    """
    return alone and n > 1 and (micro_batch is None or micro_batch >= n)


def stats_span(micro_batch: int | None, n: int, alone: bool, update: int) -> int:
    """How many updates the statistics of update number ``update`` (from 1) stand for; 0: none.

    Where the pieces come free (several ranks, or micro-batches) every update
    estimates, for itself. A lone rank that must split estimates on updates
    1, 1 + ``SPLIT_EVERY``, ... each standing for ``SPLIT_EVERY`` updates.
    """
    if not splits_for_stats(micro_batch, n, alone):
        return 1
    return SPLIT_EVERY if update % SPLIT_EVERY == 1 % SPLIT_EVERY else 0


def stats_micro_batch(micro_batch: int | None, n: int, alone: bool) -> int | None:
    """The micro-batch size of a slice of ``n`` examples whose pieces are wanted.

    A slice that :func:`splits_for_stats` is computed in two halves, as two
    workers would.
    """
    if splits_for_stats(micro_batch, n, alone):
        return math.ceil(n / 2)
    return micro_batch


def gradient_tensors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The current ``p.grad`` of each of ``params``, zeros where there is none."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def squared_norm_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i |tensors[i]|^2`` in float64, as a tensor (no device sync).

    One fused norm over all the tensors (``torch._foreach_norm``, which
    ``clip_grad_norm_`` uses too), squared and summed in float64: a handful
    of operator calls per update however many parameters the model has
    (29 µs for the six tensors of benchmarks' small MLP, where a dot product
    per tensor took 69 µs).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return torch.stack(norms).double().square().sum()


def squared_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(squared_norm_sum(tensors))


def apply_update(
    optimizer: torch.optim.Optimizer,
    base_lrs: Sequence[float],
    lr_factor: float,
) -> None:
    """Take one optimizer step, at the base learning rates times ``lr_factor``.

    Gradients are left in place: callers zero them before the next update
    (the decentralized engine keeps them as views of one flat buffer).
    """
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * lr_factor
    optimizer.step()


def check_finite(loss: float, update: int, batch_size: int, lr: float) -> None:
    """Stop a diverging run with a message that says where it diverged."""
    if not math.isfinite(loss):
        raise ConvergenceError(
            f"The training loss became {loss} at model update {update} "
            f"(batch size {batch_size}, learning rate {lr:.4g}). "
            "Lower the learning rate or start from a larger batch size."
        )


@torch.no_grad()
def loss_sum(
    module: nn.Module, criterion: nn.Module, X: torch.Tensor, y: torch.Tensor, chunk: int
) -> float:
    """Summed loss over ``X, y`` in eval mode, ``chunk`` examples at a time."""
    was_training = module.training
    module.eval()
    total = 0.0
    for start in range(0, len(X), chunk):
        xb, yb = X[start : start + chunk], y[start : start + chunk]
        total += float(criterion(module(xb), yb)) * len(xb)
    module.train(was_training)
    return total


def loss_indices(seed: int, model_updates: int, n: int, fraction: float) -> np.ndarray:
    """The examples over which a damper's training loss is estimated.

    All of them for ``fraction == 1``; otherwise a fresh random subset per
    evaluation, seeded so that every engine picks the same one.
    """
    if fraction >= 1:
        return np.arange(n)
    size = max(1, round(fraction * n))
    return np.sort(np.random.default_rng([seed, model_updates, 1]).choice(n, size, replace=False))


def gradient_stats(
    batch_sq_norm: float, piece_sq_sum: float, pieces: float, batch_size: int
) -> dict[str, float]:
    """Scalars a damper may read about the last update's gradient, before smoothing.

    ``grad_sq_norm`` is the squared norm of the update's mean gradient;
    ``gns_grad_sq`` and ``gns_trace`` the unbiased estimates of ``|G|^2``
    and ``tr(Sigma)`` from the update's pieces (:func:`adadamp.gns.raw_estimates`),
    at no extra pass.
    """
    return {
        "grad_sq_norm": batch_sq_norm,
        **gns.raw_estimates(batch_sq_norm, piece_sq_sum, pieces, batch_size),
    }
