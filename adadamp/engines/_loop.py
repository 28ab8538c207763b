"""The one loop of model updates on one rank, which every engine runs or reuses.

An update is: plan it (the damper, through :func:`~adadamp.schedule.next_update`),
refresh the damper's training loss when it is due, take this rank's slice of
the batch, sum its gradients, reduce the sums over the ranks, check for
divergence, take the optimizer step, compute the gradient statistics, and
record it. The local engine runs this loop with one rank and no reduction;
the decentralized engine runs it on every rank with an all-reduce; the
centralized engine calls its pieces (:func:`rank_gradient`, :func:`step`,
:func:`loss_chunks`, :func:`chunk_loss`) from its Dask tasks. A change to what an update computes
or records is one edit here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import gns
from ..dampers import BaseDamper
from ..examples import Examples, prefetch
from ..schedule import UpdatePlan, advance, next_update
from ..state import TrainState
from . import _step
from .base import OnUpdate, TrainConfig, UpdateRecord

# The scalars reduced with the gradients, in the last slots of the reduced buffer.
VOTE, LOSS, PIECE_SQ, PIECES = range(4)
EXTRA_SLOTS = 4


@dataclass
class RankModel:
    """What one rank computes with: its module, optimizer, loss and examples."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    examples: Examples
    config: TrainConfig


class Reducer:
    """Sums tensors in place over the ranks of a group. With one rank: nothing to do."""

    rank = 0
    world = 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks."""


def reduced_nbytes(module: nn.Module) -> int:
    """Bytes of the buffer that :func:`run_updates` reduces per update on several ranks."""
    params = [p for p in module.parameters() if p.requires_grad]
    itemsize = params[0].element_size() if params else 4
    return (sum(p.numel() for p in params) + EXTRA_SLOTS) * itemsize


def reduce_update(reducer: Reducer, flat: torch.Tensor, extras: list[float]) -> list[float]:
    """Sum the gradients (views of ``flat``) and the ``extras`` over the ranks: one reduction.

    A lone rank has nothing to add: its scalars stay Python floats, with no
    tensor writes and reads per update (a few microseconds each).
    """
    if reducer.world == 1:
        return extras
    flat[-EXTRA_SLOTS:] = torch.tensor(extras, dtype=flat.dtype, device=flat.device)
    reducer.all_reduce(flat)
    return flat[-EXTRA_SLOTS:].tolist()


def loss_chunks(
    config: TrainConfig, damper: BaseDamper, state: TrainState, n: int
) -> list[np.ndarray]:
    """The examples of the damper's loss estimate, in fixed chunks.

    The chunks (of ``worker_max_batch_size`` or ``EVAL_CHUNK`` examples) do
    not depend on how many ranks or workers share them out, and each chunk's
    sum is computed alone and added in a fixed order, so the estimate, and
    the batch size an adaptive damper derives from it, is the same bit for
    bit on any number of workers.
    """
    idx = _step.loss_indices(config.seed, state.model_updates, n, damper.loss_fraction)
    size = config.worker_max_batch_size or _step.EVAL_CHUNK
    return [idx[start : start + size] for start in range(0, len(idx), size)]


def chunk_loss(model: RankModel, indices: np.ndarray) -> float:
    """The summed loss over one chunk of ``indices`` (eval mode, no gradients)."""
    X, y = model.examples.take(torch.from_numpy(indices).to(model.examples.device))
    return _step.loss_sum(model.module, model.criterion, X, y, len(indices))


def training_loss(
    model: RankModel, damper: BaseDamper, state: TrainState, reducer: Reducer
) -> float:
    """The damper's training loss: each rank sums its chunks, one reduction gathers them."""
    chunks = loss_chunks(model.config, damper, state, len(model.examples))
    sums = torch.zeros(len(chunks), dtype=torch.float64, device=model.examples.device)
    lo, hi = _step.split_slices(len(chunks), reducer.world)[reducer.rank]
    for i in range(lo, hi):
        sums[i] = chunk_loss(model, chunks[i])
    # Each entry has one contributor, so the reduction adds only zeros to it.
    reducer.all_reduce(sums)
    return float(sums.sum()) / sum(len(c) for c in chunks)


def rank_gradient(
    model: RankModel,
    indices: torch.Tensor,
    batch_size: int,
    coming: torch.Tensor | None = None,
    norms: _step.PieceNorms | None = None,
    alone: bool = False,
) -> float:
    """Add ``indices``' share of a ``batch_size`` batch's mean gradient into ``p.grad``.

    Returns the summed loss over ``indices``. ``coming``, the slices this
    rank will likely take from this one on (a row each), is handed to the
    examples first, so that they can load the next ones while this one
    computes. With
    ``norms``, each micro-batch's gradient norm is taken too (the gradient
    statistics); ``alone`` says this rank holds the whole batch (see
    :func:`~._step.stats_micro_batch`).
    """
    if not len(indices):
        return 0.0
    if coming is not None:
        prefetch(model.examples, coming)
    X, y = model.examples.take(indices)
    micro = model.config.worker_max_batch_size
    if norms is not None:
        micro = _step.stats_micro_batch(micro, len(indices), alone)
    return _step.accumulate_gradient(model.module, model.criterion, X, y, batch_size, micro, norms)


def step(
    model: RankModel,
    plan: UpdatePlan,
    update: int,
    loss_sum: float,
    piece_sq_sum: float,
    pieces: float,
    base_lrs: list[float],
    needs_stats: bool,
    gradients: list[torch.Tensor] | None = None,
) -> tuple[float, float, dict[str, float]]:
    """Finish update number ``update`` once ``p.grad`` holds the batch's mean gradient.

    Checks the loss for divergence, computes the gradient statistics (from
    ``piece_sq_sum`` and ``pieces``, see :class:`~._step.PieceNorms`, summed
    over the ranks) and takes the optimizer step. Returns ``(mean loss,
    learning rate, raw statistics)``. ``gradients``: the tensors that hold
    the gradient, if the caller has them at hand (default: every
    parameter's ``grad``).
    """
    loss = loss_sum / plan.batch_size
    lr = base_lrs[0] * plan.lr_factor
    _step.check_finite(loss, update, plan.batch_size, lr)
    stats: dict[str, float] = {}
    if needs_stats:
        if gradients is None:
            gradients = _step.gradient_tensors(model.module.parameters())
        mean_sq = _step.squared_norm(gradients)
        stats = _step.gradient_stats(mean_sq, piece_sq_sum, pieces, plan.batch_size)
    _step.apply_update(model.optimizer, base_lrs, plan.lr_factor)
    return loss, lr, stats


def run_updates(
    model: RankModel,
    damper: BaseDamper,
    state: TrainState,
    order: torch.Tensor,
    offset: int,
    reducer: Reducer,
    on_update: OnUpdate,
    keep_going: Callable[[UpdatePlan], bool] | None = None,
    stop_vote: Callable[[], int] | None = None,
) -> tuple[int, UpdatePlan | None, int]:
    """Run updates from ``offset`` of the epoch's ``order`` until the epoch ends.

    Every rank calls this with the same damper, state and order, and advances
    them identically. ``keep_going``, asked before each update, may stop the
    run early (the decentralized engine stops when the damper wants another
    worker count). ``stop_vote``, asked on each rank before each reduction,
    returns a code, 0 for none; any other stops every rank after the update
    in which it was cast: the codes ride in the reduced buffer, so all ranks
    stop at the same update and see the same sum of codes (the decentralized
    engine's rank 0 votes when the client asked for a stop or sent its
    word). Returns the offset reached, the plan that was not run (None when
    the epoch ended) and the summed codes of the vote that stopped the run
    (0 if none did). Learning rates set per update are restored on return,
    so that skorch callbacks that schedule the base rate keep working.
    """
    module, optimizer, config = model.module, model.optimizer, model.config
    # With several ranks, gradients live as views of one flat buffer, so
    # backward writes straight into what is reduced: one reduction per
    # update, no copies. A lone rank reduces nothing: its backward passes
    # write fresh gradients, as a plain loop's do after zero_grad, with no
    # pass to zero a buffer before and none to add into it. The buffer's
    # last four slots carry the stop votes, the loss sum and this rank's
    # piece statistics (sum of |s_i|^2 / b_i, number of pieces).
    params = [p for p in module.parameters() if p.requires_grad]
    alone = reducer.world == 1
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype if params else torch.float32
    length = 0 if alone else sum(sizes) + EXTRA_SLOTS
    flat = torch.zeros(length, dtype=dtype, device=model.examples.device)
    grads = flat[:-EXTRA_SLOTS]

    def gradients() -> list[torch.Tensor]:
        """The tensors holding this rank's gradient sum (the reduced one, after the reduction)."""
        return _step.gradient_tensors(params) if alone else [grads]

    votes = 0.0
    needs_stats = config.needs_grad_stats(damper)
    if not alone:
        for p, view in zip(params, torch.split(grads, sizes)):
            p.grad = view.view_as(p)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    n = len(model.examples)
    module.train()
    try:
        while offset < n:
            began = time.perf_counter()
            if damper.needs_loss and damper.loss_due(state):
                state.train_loss = training_loss(model, damper, state, reducer)
            plan = next_update(damper, state, config.max_batch_size, offset, config.lr_scaling)
            if votes or (keep_going is not None and not keep_going(plan)):
                return offset, plan, round(votes)
            lo, hi = _step.split_slices(plan.batch_size, reducer.world)[reducer.rank]
            span = 0
            if needs_stats:
                micro = config.worker_max_batch_size
                span = _step.stats_span(micro, plan.batch_size, alone, state.model_updates + 1)
            extras = [0.0] * EXTRA_SLOTS
            if alone:
                for p in params:
                    p.grad = None
            else:
                flat.zero_()
            if stop_vote is not None:
                extras[VOTE] = stop_vote()
            if hi > lo:
                # This update's slice and the coming ones', a row each, if their
                # batch size is this one's: a guess that the examples may use to
                # load ahead (a wrong one is dropped).
                coming = order[offset + lo :].unfold(0, hi - lo, plan.batch_size)
                norms = None
                if span:
                    norms = _step.PieceNorms(gradients, plan.batch_size)
                extras[LOSS] = rank_gradient(
                    model,
                    order[offset + lo : offset + hi],
                    plan.batch_size,
                    coming,
                    norms,
                    alone=alone,
                )
                if norms is not None:
                    extras[PIECE_SQ], extras[PIECES] = norms.result()
            if alone:  # as the views of several ranks would: zeros, not None, if unused
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            extras = reduce_update(reducer, flat, extras)
            votes = extras[VOTE]
            computes_stats = config.computes_stats(damper, span)
            loss, lr, stats = step(
                model,
                plan,
                state.model_updates + 1,
                extras[LOSS],
                extras[PIECE_SQ],
                extras[PIECES],
                base_lrs,
                computes_stats,
                gradients() if computes_stats else None,
            )
            if needs_stats:
                stats = gns.smoothed(state.grad_stats, stats, max(span, 1))
            advance(state, plan.batch_size, plan.progress)
            state.last_loss, state.grad_stats = loss, stats
            offset += plan.batch_size
            on_update(
                UpdateRecord(
                    plan.damping,
                    plan.batch_size,
                    lr,
                    reducer.world,
                    loss,
                    time.perf_counter() - began,
                    stats,
                )
            )
        return offset, None, 0
    finally:
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base
        for p in params:  # detach the views, so that later loads and steps start clean
            p.grad = None
