"""Neural-network layers used by the experiments.

:class:`GhostBatchNorm` is the "ghost batch normalization" of Hoffer et al.
(2017), which Smith et al. (2018) rely on when they grow the batch size: the
statistics that batch normalization uses stay those of a small, fixed number
of examples, so growing the batch size does not change what the layer does.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(nn.Module):
    """Batch normalization over small "ghost" batches of a larger batch.

    In training mode the batch is split along its first dimension into
    ``ceil(N / virtual_batch_size)`` contiguous chunks whose sizes differ by at
    most one (so no chunk is larger than ``virtual_batch_size``, and none is
    left with only a few examples). Each chunk is normalized with its own
    per-channel mean and biased variance, exactly as :class:`torch.nn.BatchNorm1d`
    or :class:`torch.nn.BatchNorm2d` would normalize that chunk alone, and the
    running statistics are updated once per chunk, in order. One learnable
    affine ``weight`` and ``bias`` are shared by all chunks.

    In evaluation mode the running statistics normalize the whole batch at
    once, as batch normalization does.

    When ``virtual_batch_size >= N`` the layer computes the same outputs and
    running statistics as :class:`torch.nn.BatchNorm1d` / ``BatchNorm2d``; its
    state dict has the same keys, so either can load the other's state.

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` of the input.
    virtual_batch_size : int, default=32
        Largest number of examples normalized together in training mode.
    momentum : float or None, default=0.1
        Weight of each chunk's statistics in the running statistics. ``None``
        keeps a cumulative average over chunks, as in batch normalization.
    eps : float, default=1e-5
        Added to the variance for numerical stability.
    affine : bool, default=True
        Whether to learn a per-channel ``weight`` and ``bias``.

    Attributes
    ----------
    weight, bias : torch.nn.Parameter or None
        Per-channel affine parameters of shape ``(C,)`` (``None`` when
        ``affine=False``).
    running_mean, running_var : torch.Tensor
        Running per-channel mean and unbiased variance, shape ``(C,)``.
    num_batches_tracked : torch.Tensor
        Number of chunks (not batches) seen in training mode.

    Notes
    -----
    Input shapes ``(N, C)``, ``(N, C, L)`` and ``(N, C, H, W)`` are accepted;
    the statistics of a chunk are taken over every dimension but ``C``.

    Ghost batches are formed within each call to ``forward``. When the
    estimators compute a model update's gradient in micro-batches of bounded
    size (``worker_max_batch_size``) or split it over workers, each micro-batch
    is a separate call, so the ghost batches are formed within each
    micro-batch. Choose a micro-batch size that is a multiple of
    ``virtual_batch_size`` to keep every ghost batch at exactly
    ``virtual_batch_size`` examples. As in batch normalization, every
    training-mode forward pass updates the running statistics, including
    passes that only compute a loss.

    References
    ----------
    .. [1] E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize
       better: closing the generalization gap in large batch training of
       neural networks", 2017. https://arxiv.org/abs/1705.08741
    .. [2] S. L. Smith, P.-J. Kindermans, C. Ying and Q. V. Le, "Don't decay
       the learning rate, increase the batch size", 2018.
       https://arxiv.org/abs/1711.00489

    Examples
    --------
    >>> import torch
    >>> gbn = GhostBatchNorm(16, virtual_batch_size=32)
    >>> gbn(torch.randn(128, 16, 8, 8)).shape
    torch.Size([128, 16, 8, 8])
    """

    # Buffers (registered in ``__init__``): declared so that reading them
    # through ``self`` is typed as a tensor, not as ``nn.Module.__getattr__``'s
    # ``Tensor | Module``.
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("num_features", num_features)
        _check_positive_int("virtual_batch_size", virtual_batch_size)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"momentum={momentum!r} must be in [0, 1] (or None for a cumulative "
                "average of the chunk statistics)."
            )
        if not eps > 0:
            raise ValueError(f"eps={eps!r} must be positive, e.g. eps=1e-5.")

        self.num_features = int(num_features)
        self.virtual_batch_size = int(virtual_batch_size)
        self.momentum = momentum
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(self.num_features))
            self.bias = nn.Parameter(torch.empty(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # Same buffer names as torch's batch normalization so state dicts
        # transfer between the two layers.
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_var", torch.ones(self.num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Reset the running mean to 0, the running variance to 1 and the count to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and set ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def num_chunks(self, batch_size: int) -> int:
        """Number of ghost batches a training batch of ``batch_size`` is split into."""
        return max(1, math.ceil(batch_size / self.virtual_batch_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x`` of shape ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``."""
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"GhostBatchNorm expects an input of shape (N, C), (N, C, L) or "
                f"(N, C, H, W); got a {x.dim()}-D input of shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"GhostBatchNorm was built with num_features={self.num_features} "
                f"but the input has {x.shape[1]} channels (shape {tuple(x.shape)})."
            )
        if not self.training:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                momentum=0.0,
                eps=self.eps,
            )

        outputs = []
        # tensor_split balances the chunk sizes; a plain split by
        # virtual_batch_size could leave a last chunk of one example, whose
        # variance is zero.
        for chunk in torch.tensor_split(x, self.num_chunks(len(x))):
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # Cumulative average, as batch normalization does with momentum=None.
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            # F.batch_norm updates the running statistics in place, with the
            # unbiased variance, exactly as batch normalization would for this
            # chunk alone.
            outputs.append(
                F.batch_norm(
                    chunk,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    training=True,
                    momentum=factor,
                    eps=self.eps,
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, virtual_batch_size={self.virtual_batch_size}, "
            f"momentum={self.momentum}, eps={self.eps}, affine={self.affine}"
        )


def _check_positive_int(name: str, value: object) -> None:
    # numbers.Integral admits NumPy integers, which parameter grids often hold.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1.")
