"""A wall-clock model of a training run under a network, and the paper's tables.

- :mod:`adadamp.simulate.model`: the time of one update and of a whole run
  (networks, architectures, :func:`simulate_run`);
- :mod:`adadamp.simulate.paper`: the reproduction of the paper's two tables
  (:func:`paper_table`);
- :mod:`adadamp.simulate.cli`: ``adadamp simulate``.

The public names of the first two are importable from here.
"""

from .model import (
    ARCHITECTURES,
    HIGH,
    MODERATE,
    NETWORKS,
    PAPER_CENTRALIZED_OVERHEAD_S,
    T4_SECONDS_PER_EXAMPLE,
    WRN_16_4_PARAMS,
    Architecture,
    Centralized,
    Decentralized,
    Network,
    PlannedRun,
    SimResult,
    UpdateTime,
    batch_sizes_of,
    compute_seconds,
    resolve,
    simulate_run,
    update_records,
    update_time,
)
from .paper import (
    PAPER_DELAY,
    PAPER_EPOCHS,
    PAPER_FACTOR,
    PAPER_GRADS_PER_WORKER,
    PAPER_N_EXAMPLES,
    PAPER_RUNS,
    PaperRow,
    PaperTable,
    format_paper_table,
    paper_table,
)

__all__ = [
    "ARCHITECTURES",
    "HIGH",
    "MODERATE",
    "NETWORKS",
    "PAPER_CENTRALIZED_OVERHEAD_S",
    "PAPER_DELAY",
    "PAPER_EPOCHS",
    "PAPER_FACTOR",
    "PAPER_GRADS_PER_WORKER",
    "PAPER_N_EXAMPLES",
    "PAPER_RUNS",
    "T4_SECONDS_PER_EXAMPLE",
    "WRN_16_4_PARAMS",
    "Architecture",
    "Centralized",
    "Decentralized",
    "Network",
    "PaperRow",
    "PaperTable",
    "PlannedRun",
    "SimResult",
    "UpdateTime",
    "batch_sizes_of",
    "compute_seconds",
    "format_paper_table",
    "paper_table",
    "resolve",
    "simulate_run",
    "update_records",
    "update_time",
]
