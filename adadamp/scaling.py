"""How many workers a batch size calls for."""
from __future__ import annotations

import math


def workers_for(
    batch_size: float, grads_per_worker: int, min_workers: int = 1, max_workers: int | None = None
) -> int:
    """``clip(ceil(batch_size / grads_per_worker), min_workers, max_workers)``.

    Growing the workers with the batch keeps the examples per worker, and so
    the time of one model update, about constant.
    """
    wanted = max(1, math.ceil(batch_size / grads_per_worker))
    wanted = max(wanted, min_workers)
    if max_workers is not None:
        wanted = min(wanted, max_workers)
    return wanted
