"""The gradient and update routine that every engine shares.

A model update over ``B`` examples split into ``P`` slices is: each worker sums
per-example gradients over its slice (:func:`accumulate_gradient_sum`), the
sums are added over workers, divided by ``B``, and one optimizer step is taken
(:func:`apply_update`). Because workers add sums rather than averaging means,
the result does not depend on ``P``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

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


def accumulate_gradient_sum(
    module: nn.Module,
    criterion: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    micro_batch: int | None = None,
) -> float:
    """Add the *sum* of per-example gradients over ``X, y`` into ``p.grad``.

    Works in micro-batches of at most ``micro_batch`` examples so memory stays
    bounded whatever the slice size. ``criterion`` must average over its batch
    (PyTorch's default ``reduction='mean'``); the mean is scaled back to a sum.
    Returns the summed loss over the examples.
    """
    n = len(X)
    step = n if not micro_batch else micro_batch
    loss_sum = 0.0
    for start in range(0, n, max(step, 1)):
        xb, yb = X[start : start + step], y[start : start + step]
        loss = criterion(module(xb), yb) * len(xb)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def gradient_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The current ``p.grad`` of every parameter, zeros where there is none."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def squared_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(sum(t.detach().double().pow(2).sum() for t in tensors))


def apply_update(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    base_lrs: Sequence[float],
    lr_factor: float,
    batch_size: int,
) -> None:
    """Turn the summed gradients in ``p.grad`` into a mean and take one step.

    Gradients are left in place: callers zero them before the next update
    (the decentralized engine keeps them as views of one flat buffer).
    """
    for p in module.parameters():
        if p.grad is not None:
            p.grad.div_(batch_size)
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
    mean_grad_sq_norm: float, worker_sq_norm_sum: float, workers: int, batch_size: int
) -> dict[str, float]:
    """Scalars a damper may read about the last update's gradient.

    ``grad_sq_norm`` is the squared norm of the update's mean gradient;
    ``worker_grad_sq_norm`` the mean over workers of each worker's own mean
    gradient's squared norm, over ``worker_batch_size`` examples. Two batch
    sizes with their squared norms are what the gradient noise scale
    (McCandlish et al., 2018) is estimated from, at no extra pass.
    """
    return {
        "grad_sq_norm": mean_grad_sq_norm,
        "worker_grad_sq_norm": worker_sq_norm_sum / workers,
        "worker_batch_size": batch_size / workers,
    }
