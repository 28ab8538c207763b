"""The synthetic experiment: a linear network trained four ways.

The model is ``y = w3^T W2 W1 x`` (:class:`~adadamp.experiments.models.LinearNetwork`)
on Gaussian regression data (:func:`~adadamp.experiments.data.make_linear_network_data`):
a linear function of ``x``, yet a non-convex loss in the weights. Four batch
size policies train it with the same plain SGD optimizer and learning rate:

- ``AdaDamp``: the batch grows as the training loss falls,
  ``B = b * (F0 - F*) / (Fk - F*)``;
- ``PadaDamp``: the batch grows linearly with the model updates;
- ``SGD``: a constant small batch ``b``;
- ``GD``: the whole training set every update.

The experiment counts, for each policy, the model updates and the examples
(gradients computed) needed to bring the training loss below a threshold.
Small batches are cheap in examples but noisy, so they take many updates;
full batches take few updates but many examples. AdaDamp should need about
as few updates as GD and about as few examples as SGD.

Run it with ``python -m adadamp.experiments.synthetic --out DIR``: it prints
the table and writes two figures (training loss against model updates and
against examples) and ``synthetic.json``.

Notes
-----
The training loss is the mean squared error over the whole training set,
evaluated by the engine (the same pass AdaDamp uses) at every one of the
first 50 updates and then at 60 log-spaced update counts per decade, so a
threshold crossing is located to within 4 % of the update count. These
evaluations are not counted as examples: examples are the gradients computed
for the model updates, the work the batch size controls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dampers import AdaDamp, BaseDamper, Constant, GradientDescent, PadaDamp
from ..state import TrainState
from .results import SyntheticRun
from .runtime import torch_threads

# SyntheticRun lives in results.py (the plots read it too); it is listed here
# as the type of SyntheticResult.runs.
__all__ = [
    "METHODS",
    "LossRecorder",
    "SyntheticConfig",
    "SyntheticResult",
    "SyntheticRun",
    "format_table",
    "main",
    "make_damper",
    "probe_points",
    "run_synthetic",
    "write_outputs",
]

METHODS = ("AdaDamp", "PadaDamp", "SGD", "GD")


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic experiment.

    Parameters
    ----------
    n_train, n_test, d, noise : int, int, int, float
        The data (see :func:`~adadamp.experiments.data.make_linear_network_data`).
    lr : float
        Learning rate of plain SGD, the same for every method. Twice this
        value makes SGD's small batches diverge on the default data.
    batch_size : int
        SGD's batch size, and the initial batch of AdaDamp and PadaDamp.
    pada_rate : float
        Examples PadaDamp adds to the batch per model update.
    epochs : int
        Epochs of AdaDamp, PadaDamp and SGD.
    gd_epochs : int
        Epochs of GD, which makes one model update per epoch.
    threshold_factor : float
        The loss threshold is this times the least-squares test loss. It
        lies above the floor where SGD's constant small batch stalls (at
        the default learning rate), so every method reaches it.
    seed : int
        Seed of the data, the initial weights (the same for every method)
        and the order of the examples.
    threads : int or None
        Torch threads while training (one is fastest for this small model).
    """

    n_train: int = 8000
    n_test: int = 2000
    d: int = 100
    noise: float = 1.0
    lr: float = 0.005
    batch_size: int = 32
    pada_rate: float = 1.0
    epochs: int = 8
    gd_epochs: int = 60
    threshold_factor: float = 1.2
    seed: int = 0
    threads: int | None = 1

    def epochs_of(self, method: str) -> int:
        """Epochs to train ``method`` for."""
        return self.gd_epochs if method == "GD" else self.epochs


@dataclass
class SyntheticResult:
    """All runs of the experiment, the reference loss and the threshold."""

    config: SyntheticConfig
    runs: list[SyntheticRun]
    least_squares_loss: float
    threshold: float

    def run(self, name: str) -> SyntheticRun:
        """The run of method ``name``."""
        return next(r for r in self.runs if r.name == name)

    def reach(self) -> dict[str, tuple[int, int] | None]:
        """Per method, ``(updates, examples)`` to reach the threshold (None: never)."""
        return {r.name: r.first_reach(self.threshold) for r in self.runs}

    def ratios(self) -> dict[str, float]:
        """The experiment's claims as ratios (nan where a method never reached the threshold).

        ``sgd_updates_over_adadamp``: SGD's updates / AdaDamp's;
        ``adadamp_updates_over_gd``: AdaDamp's updates / GD's;
        ``gd_examples_over_adadamp``: GD's examples / AdaDamp's;
        ``adadamp_examples_over_sgd``: AdaDamp's examples / SGD's.
        """
        reach = self.reach()

        def get(name: str, i: int) -> float:
            hit = reach.get(name)
            return float("nan") if hit is None else float(hit[i])

        return {
            "sgd_updates_over_adadamp": get("SGD", 0) / get("AdaDamp", 0),
            "adadamp_updates_over_gd": get("AdaDamp", 0) / get("GD", 0),
            "gd_examples_over_adadamp": get("GD", 1) / get("AdaDamp", 1),
            "adadamp_examples_over_sgd": get("AdaDamp", 1) / get("SGD", 1),
        }


class LossRecorder(BaseDamper):
    """Wrap a damper and record the training loss at chosen update counts.

    It declares ``needs_loss``, so the engine evaluates the training loss
    (``state.train_loss``) whenever :meth:`loss_due` says so: at the update
    counts in ``points``, and whenever the wrapped damper needs it. The
    batch sizes are the wrapped damper's, unchanged.

    Parameters
    ----------
    damper : BaseDamper
        The batch-size policy to run.
    points : frozenset of int
        Update counts ``k`` at which to record the loss after ``k`` updates.

    Attributes
    ----------
    records_ : list of tuple
        ``(model_updates, examples, train_loss)`` per recorded point.
    """

    needs_loss = True
    adaptive = True

    def __init__(self, damper: BaseDamper | None = None, points: frozenset[int] = frozenset()):
        self.damper = damper
        self.points = points
        self.records_: list[tuple[int, int, float]] = []

    def validate(self) -> None:
        if not isinstance(self.damper, BaseDamper):
            raise TypeError(f"LossRecorder: damper must be a damper, got {self.damper!r}.")
        self.damper.validate()

    @property
    def _wrapped(self) -> BaseDamper:
        # The default None only exists for scikit-learn's parameter handling;
        # validate() rejects it before an engine asks anything of the damper.
        assert self.damper is not None, "LossRecorder: no damper to wrap."
        return self.damper

    @property
    def max_batch_size(self) -> int | None:
        return self._wrapped.max_batch_size

    def loss_due(self, state: TrainState) -> bool:
        inner = self._wrapped.needs_loss and self._wrapped.loss_due(state)
        return inner or state.model_updates in self.points

    def damping(self, state: TrainState) -> float:
        if state.model_updates in self.points and (
            not self.records_ or self.records_[-1][0] != state.model_updates
        ):
            # loss_due was True at this update, so the engine has just evaluated the loss.
            loss = state.train_loss
            assert loss is not None, "the engine did not evaluate the training loss."
            self.records_.append((state.model_updates, state.examples_seen, loss))
        return self._wrapped.damping(state)


def probe_points(max_updates: int, dense: int = 50, per_decade: int = 60) -> frozenset[int]:
    """Every update count up to ``dense``, then ``per_decade`` log-spaced ones per decade."""
    decades = max(1.0, np.log10(max(max_updates, 10)))
    spaced = np.logspace(0, decades, int(np.ceil(decades * per_decade)) + 1)
    return frozenset(range(dense + 1)) | frozenset(int(k) for k in np.round(spaced))


def make_damper(name: str, config: SyntheticConfig) -> BaseDamper:
    """The batch-size policy of method ``name``."""
    if name == "AdaDamp":
        # F* = 0: the squared error is non-negative, and the noise keeps the
        # loss near noise**2, so the batch grows by at most F0 / noise**2.
        return AdaDamp(initial=config.batch_size)
    if name == "PadaDamp":
        return PadaDamp(initial=config.batch_size, rate=config.pada_rate)
    if name == "SGD":
        return Constant(config.batch_size)
    if name == "GD":
        return GradientDescent()
    raise ValueError(f"method must be one of {METHODS}, got {name!r}.")


def _train(name: str, config: SyntheticConfig, data: Sequence[torch.Tensor]) -> SyntheticRun:
    from ..estimators import DaskRegressor
    from .models import LinearNetwork

    X_train, _, y_train, _ = data
    epochs = config.epochs_of(name)
    damper = make_damper(name, config)
    # A bound on the updates: every batch holds at least one example.
    max_updates = epochs * len(X_train) if name != "GD" else epochs
    recorder = LossRecorder(damper, probe_points(max_updates))
    net = DaskRegressor(
        LinearNetwork,
        module__d=config.d,
        batch_size=recorder,
        optimizer=torch.optim.SGD,
        lr=config.lr,
        max_epochs=epochs,
        backend="local",
        random_state=config.seed,
        verbose=0,
    )
    # The same initial weights for every method.
    torch.manual_seed(config.seed)
    net.initialize()
    began = time.perf_counter()
    net.fit(X_train, y_train)
    seconds = time.perf_counter() - began
    # The estimator trains a copy of the damper it was given.
    records = np.array(net.damper_.records_, dtype=float)
    curve = {
        "model_updates": records[:, 0].astype(np.int64),
        "examples": records[:, 1].astype(np.int64),
        "train_loss": records[:, 2],
    }
    last = net.history[-1]
    return SyntheticRun(name, curve, int(last["model_updates"]), int(last["examples"]), seconds)


def run_synthetic(
    config: SyntheticConfig = SyntheticConfig(), methods: Sequence[str] = METHODS
) -> SyntheticResult:
    """Generate the data and train every method of ``methods``."""
    from .data import least_squares_test_loss, make_linear_network_data

    data = make_linear_network_data(
        n_train=config.n_train,
        n_test=config.n_test,
        d=config.d,
        noise=config.noise,
        seed=config.seed,
    )
    X_train, X_test, y_train, y_test = data
    reference = least_squares_test_loss(X_train, y_train, X_test, y_test)
    with torch_threads(config.threads):
        runs = [_train(name, config, data) for name in methods]
    return SyntheticResult(config, runs, reference, config.threshold_factor * reference)


def format_table(result: SyntheticResult) -> str:
    """Updates and examples to reach the threshold, per method, and the ratios."""
    reach = result.reach()
    lines = [
        f"Training loss threshold {result.threshold:.4g} "
        f"({result.config.threshold_factor:g} x the least-squares test loss "
        f"{result.least_squares_loss:.4g})",
        f"{'method':<10}{'model updates':>15}{'examples':>12}{'final loss':>12}{'time (s)':>10}",
    ]
    for run in result.runs:
        hit = reach[run.name]
        updates, examples = ("never", "never") if hit is None else (f"{hit[0]:,}", f"{hit[1]:,}")
        lines.append(
            f"{run.name:<10}{updates:>15}{examples:>12}"
            f"{run.curve['train_loss'][-1]:>12.4g}{run.seconds:>10.1f}"
        )
    r = result.ratios()
    lines += [
        "",
        f"AdaDamp needs {r['adadamp_updates_over_gd']:.2f}x the model updates of GD and "
        f"{1 / r['sgd_updates_over_adadamp']:.3f}x those of SGD "
        f"(SGD needs {r['sgd_updates_over_adadamp']:.1f}x more);",
        f"AdaDamp needs {r['adadamp_examples_over_sgd']:.2f}x the examples of SGD and "
        f"{1 / r['gd_examples_over_adadamp']:.3f}x those of GD "
        f"(GD needs {r['gd_examples_over_adadamp']:.1f}x more).",
    ]
    return "\n".join(lines)


def write_outputs(result: SyntheticResult, out: Path) -> list[Path]:
    """Write the two figures and ``synthetic.json`` (curves, reach, ratios) to ``out``."""
    from .plots import plot_synthetic

    out.mkdir(parents=True, exist_ok=True)
    written = plot_synthetic(result.runs, result.least_squares_loss, out, result.threshold)
    payload: dict[str, Any] = {
        "config": asdict(result.config),
        "least_squares_test_loss": result.least_squares_loss,
        "threshold": result.threshold,
        "reach": {
            name: None if hit is None else {"model_updates": hit[0], "examples": hit[1]}
            for name, hit in result.reach().items()
        },
        "ratios": result.ratios(),
        "runs": [
            {
                "name": r.name,
                "model_updates": r.model_updates,
                "examples": r.examples,
                "seconds": r.seconds,
                **{k: v.tolist() for k, v in r.curve.items()},
            }
            for r in result.runs
        ],
    }
    path = out / "synthetic.json"
    path.write_text(json.dumps(payload, indent=1))
    written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adadamp.experiments.synthetic``: run, print the table, write ``--out``."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m adadamp.experiments.synthetic",
        description="AdaDamp, PadaDamp, SGD and GD on a linear network.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("synthetic-out"),
        help="folder for the figures and synthetic.json (default synthetic-out)",
    )
    numeric: list[tuple[str, type[int] | type[float]]] = [
        (name, int)
        for name in ("n_train", "n_test", "d", "batch_size", "epochs", "gd_epochs", "seed")
    ]
    numeric += [(name, float) for name in ("noise", "lr", "pada_rate", "threshold_factor")]
    for name, kind in numeric:
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"default {default}"
        )
    args = parser.parse_args(argv)
    config = SyntheticConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    result = run_synthetic(config)
    print(format_table(result))
    written = write_outputs(result, args.out)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
