"""scikit-learn estimators over a PyTorch module that grow the batch size as they train.

``DaskClassifier`` and ``DaskRegressor`` are skorch nets: they keep skorch's
parameter routing (``module__*``, ``optimizer__*``), callbacks, ``history_``
and ``save_params``/``load_params``. What they add is the batch size: an
``int``, or a damper (``batch_size=GeoDamp, batch_size__factor=5``) whose
requested batch size drives every model update, and an engine (``backend``)
that computes those updates in this process or on a Dask cluster.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from skorch import NeuralNet, NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import EpochScoring, PrintLog
from skorch.dataset import ValidSplit
from skorch.utils import is_dataset, to_tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import gns
from ._batch_size_param import resolve_damper
from ._checks import is_int
from ._devices import check_device
from ._inputs import plain_input
from ._tensors import match_dtype
from ._training_data import check_dataset, training_examples
from ._validation import check_estimator_params, check_training_data
from .dampers import BaseDamper
from .engines import Engine, TrainConfig, UpdateRecord, resolve_engine
from .examples import Examples, close
from .state import TrainState

if TYPE_CHECKING:
    from skorch.history import History

# Batch size of prediction and validation passes: only memory depends on it.
PREDICT_BATCH_SIZE = 1024

# Losses that compare predictions and targets element by element (and broadcast).
_ELEMENTWISE_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss)

# Per-update records kept in ``history_[epoch]["batches"]``.
UPDATE_KEYS = ("damping", "lr", "workers", "duration")


# With lr_scaling="adascale", a fit runs epochs until the progress clock has
# advanced by its epochs, but never more than this many times as many epochs.
ADASCALE_MAX_EPOCH_FACTOR = 10


def _epoch_range(lr_scaling: str, state: TrainState, epochs: int):
    """The epochs a fit runs: ``epochs`` of them, or with AdaScale, until its clock has moved on.

    AdaScale's clock (``state.progress``) advances by the gain ``r <= S`` per
    update, in base batches, so a fit of ``epochs`` epochs at AdaScale makes
    as much progress as ``epochs`` epochs at the base batch size: it may take
    more epochs of data (at most ``ADASCALE_MAX_EPOCH_FACTOR * epochs``).
    """
    target = state.progress + epochs
    done = 0
    while done < epochs or (
        lr_scaling == "adascale"
        and state.progress < target - 1e-9
        and done < ADASCALE_MAX_EPOCH_FACTOR * epochs
    ):
        yield done
        done += 1


def _is_live_client(client) -> bool:
    # The validated kinds are None, an address string and a distributed.Client.
    return client is not None and not isinstance(client, str)


class _DampedNetMixin:
    """What DaskClassifier and DaskRegressor add to their skorch base class."""

    prefixes_ = NeuralNet.prefixes_ + ["batch_size"]

    if TYPE_CHECKING:
        # Provided by the skorch net this is mixed into (NeuralNet), except
        # ``_target_dtype``, which DaskClassifier and DaskRegressor define.
        batch_size: int | BaseDamper | type[BaseDamper]
        device: str | torch.device | None
        history: History
        module_: torch.nn.Module
        verbose: int

        def get_params_for(self, prefix: str) -> dict[str, Any]: ...

        _target_dtype: torch.dtype | None

    def _init_damped_params(
        self,
        *,
        max_batch_size,
        grads_per_worker,
        min_workers,
        max_workers,
        worker_max_batch_size,
        backend,
        client,
        random_state,
        lr_scaling,
    ):
        self.max_batch_size = max_batch_size
        self.grads_per_worker = grads_per_worker
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.worker_max_batch_size = worker_max_batch_size
        self.backend = backend
        self.client = client
        self.random_state = random_state
        self.lr_scaling = lr_scaling

    @property
    def _default_callbacks(self):
        # The resume snapshot and the rescales are not scalars: keep them out of the table.
        ignored = ["train_state", "epochs", "examples", "rescales", "progress"]
        return [
            (name, PrintLog(keys_ignored=ignored)) if name == "print_log" else (name, cb)
            for name, cb in super()._default_callbacks
        ]

    # ------------------------------------------------------------ setup
    def set_params(self, **kwargs):
        # skorch re-initializes the component a prefixed parameter belongs to,
        # and on an initialized net fails on a prefix that names no component.
        # ``batch_size`` and ``batch_size__*`` only need storing: the damper is
        # rebuilt from them when training next starts (the counters are kept,
        # so ``partial_fit`` continues the epochs under the new damper).
        damper_params = {
            key: value
            for key, value in kwargs.items()
            if key == "batch_size" or key.startswith("batch_size__")
        }
        for key, value in damper_params.items():
            setattr(self, key, value)
            if key != "batch_size":
                self._params_to_validate.add(key)
        if damper_params and getattr(self, "damper_", None) is not None:
            self.damper_ = None
        rest = {key: value for key, value in kwargs.items() if key not in damper_params}
        if rest:
            super().set_params(**rest)
        return self

    def initialize_callbacks(self):
        super().initialize_callbacks()
        # Engines run the training updates and hand back no predictions, so a
        # scorer of the training set would find its cache of them empty: it
        # runs inference over the training set instead.
        for _, cb in self.callbacks_:
            if isinstance(cb, EpochScoring) and cb.on_train and cb.use_caching:
                cb.use_caching = False
        return self

    # ------------------------------------------------------------ copies
    def __sklearn_clone__(self):
        # scikit-learn deep-copies every parameter that is not an estimator,
        # and a live Client cannot be copied (it holds an event loop and
        # sockets). The clone must train on the same cluster: it shares it.
        client = self.client
        if not _is_live_client(client):
            return super().__sklearn_clone__()
        self.client = None
        try:
            clone = super().__sklearn_clone__()
        finally:
            self.client = client
        clone.client = client
        return clone

    def __getstate__(self):
        # A live Client belongs to this process; a pickled estimator keeps its
        # model and drops the client (an address string is kept).
        state = super().__getstate__()
        if _is_live_client(state.get("client")):
            state["client"] = None
        return state

    def initialize_module(self):
        # With a random_state the initial weights are seeded too, in a forked
        # generator so that the program's global one is left as it was.
        # (A random_state that is not an int is refused when fit checks its parameters.)
        if self.random_state is None or not is_int(self.random_state):
            return super().initialize_module()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state))
            return super().initialize_module()

    def initialize(self):
        # Before skorch moves the module: torch's own error names no parameter.
        check_device(self.device)
        super().initialize()
        self.damper_: BaseDamper | None = None
        self.train_state_: TrainState | None = None
        self.seed_: int | None = None
        return self

    def _resolve_damper(self) -> BaseDamper:
        if getattr(self, "damper_", None) is None:
            self.damper_ = resolve_damper(self.batch_size, self.get_params_for("batch_size"))
        return self.damper_

    def _resume_or_start_state(self, n_examples: int) -> TrainState:
        """The training state to continue from: in memory, in a loaded history, or fresh."""
        if self.train_state_ is not None:
            if self.train_state_.n_examples != n_examples:
                # Epoch arithmetic is per training-set size: keep the counters, re-base n.
                self.train_state_.n_examples = n_examples
            return self.train_state_
        snapshot = None
        for row in reversed(self.history):
            if "train_state" in row:
                snapshot = row["train_state"]
                break
        state = TrainState(n_examples)
        if snapshot is not None:
            # What the previous update left for the damper (RadaDamp averages the
            # last batch loss in) is restored too. The counters carry on over
            # this training set, whatever its size was.
            state.load_state_dict({**snapshot, "n_examples": n_examples})
            self._load_damper_state(snapshot)
            self.seed_ = snapshot["seed"]
        else:
            self.seed_ = (
                int(self.random_state)
                if self.random_state is not None
                else int(np.random.default_rng().integers(2**31 - 1))
            )
        self.train_state_ = state
        return state

    def _load_damper_state(self, snapshot: dict) -> None:
        """Restore what the damper learned before the snapshot was taken.

        Only learned state (names ending in ``_``) is restored: the damper's
        parameters are this estimator's ``batch_size__*``, which may have been
        changed on purpose. A damper of another class learned nothing this one
        can use, and starts afresh (the update and example counts still carry on).
        """
        if snapshot.get("damper_class", type(self.damper_).__name__) != type(self.damper_).__name__:
            return
        learned = {k: v for k, v in snapshot["damper"].items() if k.endswith("_")}
        self.damper_.load_state_dict(learned)

    def _warn_if_capped_from_the_start(self, damper: BaseDamper) -> None:
        """Warn when ``max_batch_size`` caps the very first update of a fresh fit.

        Legal, and the max-batch-size rule then divides the learning rate from
        the start: more likely a slip than a plan, and silent otherwise.
        """
        initial = getattr(damper, "initial", None)
        fresh = self.train_state_ is None or self.train_state_.model_updates == 0
        if (
            fresh
            and self.max_batch_size is not None
            and initial is not None
            and initial > self.max_batch_size
        ):
            warnings.warn(
                f"max_batch_size={self.max_batch_size} is below the initial batch size "
                f"{initial} of {type(damper).__name__}: every update uses at most "
                f"{self.max_batch_size} examples and the learning rate is divided by "
                f"{initial / self.max_batch_size:.3g} from the first update on.",
                UserWarning,
                stacklevel=4,
            )

    def _train_config(self, epochs: int) -> TrainConfig:
        # _resume_or_start_state sets the seed before any engine starts.
        assert self.seed_ is not None, "the training state has not been set up."
        return TrainConfig(
            seed=self.seed_,
            epochs=epochs,
            max_batch_size=self.max_batch_size,
            worker_max_batch_size=self.worker_max_batch_size,
            grads_per_worker=self.grads_per_worker,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            device=str(self.device),
            lr_scaling=self.lr_scaling,
        )

    def _check_target_shape(self, examples: Examples) -> None:
        """Raise before training when the targets cannot be compared with the module's output."""

    def _training_examples(self, dataset) -> Examples:
        """How the engines reach ``dataset`` (see ``_training_data.training_examples``)."""
        param = next(self.module_.parameters(), None)
        loader_params = {
            k: v
            for k, v in self.get_params_for("iterator_train").items()
            if k not in ("batch_size", "shuffle")
        }
        return training_examples(
            dataset,
            # Transforms are seeded only when asked: unseeded fits stay random.
            seed=self.seed_ if self.random_state is not None else None,
            float_dtype=param.dtype if param is not None and param.is_floating_point() else None,
            target_dtype=self._target_dtype,
            loader_params=loader_params,
        )

    @staticmethod
    def _first_example(examples: Examples) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training example, read by a copy of ``examples`` closed after."""
        probe = examples.to(examples.device)
        try:
            return probe.take(torch.zeros(1, dtype=torch.long, device=probe.device))
        finally:
            close(probe)

    def get_split_datasets(self, X, y=None, **fit_params):
        # A stratified split of a dataset given without y needs its targets:
        # torchvision-style datasets (and NpyDataset) name them ``targets``.
        if y is None and is_dataset(X) and getattr(X, "targets", None) is not None:
            y = np.asarray(X.targets)
        split = self.train_split
        if y is None and is_dataset(X) and isinstance(split, ValidSplit) and split.stratified:
            raise ValueError(
                f"A stratified validation split of {type(X).__name__} needs its targets: "
                "pass them as y (fit(dataset, y=targets)), give the dataset a `targets` "
                "attribute, or use train_split=ValidSplit(5, stratified=False) or None."
            )
        return super().get_split_datasets(X, y, **fit_params)

    def get_dataset(self, X, y=None):
        # Every input passes here (fit, partial_fit, predict, predict_proba,
        # score): pandas becomes NumPy, Dask collections are refused.
        return super().get_dataset(plain_input(X, "X"), plain_input(y, "y"))

    # ------------------------------------------------------------ training
    def _routed_fit_params(self, routing_method: str, fit_params: dict) -> tuple[dict, dict]:
        """The fit params for ``train_split`` and for the module, routed as skorch does.

        skorch >= 1.4 passes ``_routing_method`` (fit or partial_fit) into
        ``fit_loop``; with scikit-learn's metadata routing enabled, the
        splitter gets only what was requested for it.
        """
        try:
            from sklearn.utils.metadata_routing import _routing_enabled, process_routing
        except ImportError:  # pragma: no cover - scikit-learn without routing
            return fit_params, fit_params
        if "get_metadata_routing" in vars(NeuralNet) and _routing_enabled():
            routed = process_routing(self, routing_method, **fit_params)
            return routed.get("splitter", {"split": {}})["split"], fit_params
        return fit_params, fit_params

    def fit_loop(self, X, y=None, epochs=None, *, _routing_method="fit", **fit_params):
        """Train for ``epochs`` epochs (default ``max_epochs``), growing the batch size.

        All input checks run before any engine or cluster work starts.
        """
        check_estimator_params(self)
        check_dataset(X)
        check_training_data(X, y)
        self.check_data(X, y)
        self.check_training_readiness()
        damper = self._resolve_damper()
        epochs = epochs if epochs is not None else self.max_epochs
        self._warn_if_capped_from_the_start(damper)

        split_params, forward_params = self._routed_fit_params(_routing_method, fit_params)
        dataset_train, dataset_valid = self.get_split_datasets(X, y, **split_params)
        state = self._resume_or_start_state(len(dataset_train))
        examples = self._training_examples(dataset_train)
        self._check_target_shape(examples)
        iterator_valid = None
        if dataset_valid is not None:
            iterator_valid = self.get_iterator(dataset_valid, training=False)
        on_epoch_kwargs = {"dataset_train": dataset_train, "dataset_valid": dataset_valid}

        engine = resolve_engine(self.backend, self.client)
        self.fit_id_: str | None = None
        try:
            engine.start(
                self._train_config(epochs),
                self.module_,
                self.optimizer_,
                self.criterion_,
                examples,
                self.client,
            )
            # The Dask engines name each fit; the workers file its module and data under it.
            self.fit_id_ = engine.fit_id
            for _ in _epoch_range(self.lr_scaling, state, epochs):
                self.notify("on_epoch_begin", **on_epoch_kwargs)
                self._train_one_epoch(engine, damper, state)
                self.run_single_epoch(
                    iterator_valid,
                    training=False,
                    prefix="valid",
                    step_fn=self.validation_step,
                    **forward_params,
                )
                self.notify("on_epoch_end", **on_epoch_kwargs)
        finally:
            engine.close()
        return self

    def _train_one_epoch(self, engine: Engine, damper: BaseDamper, state: TrainState) -> None:
        history = self.history
        # Epochs always consume whole permutations, so this is an integer.
        epoch_index = round(state.epochs)
        # A bar redrawn with carriage returns only reads well on a terminal;
        # in a file or pipe, skorch's per-epoch lines are the progress report.
        bar = tqdm(
            total=state.n_examples,
            desc=f"epoch {len(history)}",
            unit="ex",
            leave=False,
            file=sys.stderr,
            disable=not self.verbose or not sys.stderr.isatty(),
        )

        def on_update(record: UpdateRecord) -> None:
            history.new_batch()
            history.record_batch("train_loss", record.loss)
            history.record_batch("train_batch_size", record.batch_size)
            for key in UPDATE_KEYS:
                history.record_batch(key, getattr(record, key))
            for key in gns.HISTORY_KEYS:
                if key in record.grad_stats:
                    history.record_batch(key, record.grad_stats[key])
            if not bar.disable:  # formatting the postfix costs as much as recording
                bar.update(record.batch_size)
                bar.set_postfix(batch_size=record.batch_size, loss=f"{record.loss:.4g}")

        with bar:
            engine.run_epoch(epoch_index, damper, state, on_update)
        updates = history[-1, "batches"]
        history.record("train_batch_count", len(updates))
        history.record("batch_size", max(u["train_batch_size"] for u in updates))
        history.record("lr", updates[-1]["lr"])
        history.record("workers", max(u["workers"] for u in updates))
        # Each change of the worker count, with the seconds training stalled for it.
        history.record("rescales", engine.drain_rescales())
        history.record("model_updates", state.model_updates)
        history.record("examples", state.examples_seen)
        history.record("epochs", state.epochs)
        history.record("progress", state.progress)
        history.record(
            "train_state",
            {
                **state.state_dict(),
                "seed": self.seed_,
                "damper": damper.state_dict(),
                "damper_class": type(damper).__name__,
            },
        )

    # ------------------------------------------------------------ datasets as X
    def fit(self, X, y=None, **fit_params):
        """Train from scratch; ``X`` may be a map-style dataset of ``(x, y)`` (then no ``y``)."""
        return super().fit(X, y, **fit_params)

    def score(self, X, y=None, sample_weight=None):
        """scikit-learn's score; for a dataset ``X`` without ``y``, its own targets."""
        if y is None and is_dataset(X):
            y = dataset_targets(X)
        return super().score(X, y, sample_weight=sample_weight)

    # ------------------------------------------------------------ prediction
    def get_iterator(self, dataset, training=False):
        # ``batch_size`` may be a damper: prediction passes use a fixed size.
        prefix = "iterator_train" if training else "iterator_valid"
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.worker_max_batch_size or PREDICT_BATCH_SIZE)
        iterator = self.iterator_train if training else self.iterator_valid
        return iterator(dataset, **kwargs)

    def infer(self, x, **fit_params):
        if not isinstance(x, dict):
            x = match_dtype(to_tensor(x, device=self.device), self.module_)
        return super().infer(x, **fit_params)


def dataset_targets(dataset) -> np.ndarray:
    """The targets of a dataset of ``(x, y)`` items, read in order, as one array."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    loader = DataLoader(dataset, batch_size=PREDICT_BATCH_SIZE, shuffle=False)
    return torch.cat([torch.as_tensor(batch[1]) for batch in loader]).numpy()


_DAMPED_DOC = """
    Added parameters
    ----------------
    batch_size : int, damper instance or damper class, default=32
        The batch size of every model update: a constant ``int``, or a damper
        from :mod:`adadamp.dampers` (a class is built from ``batch_size__*``
        parameters, e.g. ``batch_size=GeoDamp, batch_size__factor=5``).
    max_batch_size : int or None, default=None
        Above it the update uses ``max_batch_size`` examples and the learning
        rate ``lr * max_batch_size / B`` instead.
    grads_per_worker : int, default=32
        Examples per worker: ``ceil(B / grads_per_worker)`` workers are wanted.
    min_workers, max_workers : int, default=1 and None
        Bounds on the number of workers wanted. Training does not wait for
        workers to start: it runs on fewer while they do.
    worker_max_batch_size : int or None, default=None
        Largest micro-batch one worker computes at once; larger slices
        accumulate gradients over several.
    backend : {"auto", "local", "centralized", "decentralized"} or Engine, default="auto"
        Who computes the updates. ``"auto"`` is ``"decentralized"`` when a
        ``client`` is given or a Dask client exists, else ``"local"``. An
        :class:`adadamp.engines.Engine` subclass (built without arguments) or
        instance brings an engine of one's own.
    client : distributed.Client, scheduler address or None, default=None
        The Dask cluster; with None the current client, else an embedded
        ``LocalCluster`` that lives for one fit. ``clone`` (and so
        ``GridSearchCV``) gives the clone the same client. Pickling drops a
        ``Client`` (it belongs to this process) and keeps an address string:
        an unpickled estimator predicts anywhere, and trains on the current
        client or an embedded cluster unless given a new ``client``.
    random_state : int or None, default=None
        Seeds everything random in a fit: the module's initial weights, the
        order of examples in every epoch, the examples of loss estimates and,
        for a dataset, its transforms' draws per (epoch, example). Two fits
        with the same value give the same weights. None: a fresh seed per fit.
    iterator_train__num_workers, iterator_train__pin_memory, iterator_train__prefetch_factor : \
optional
        How a map-style dataset ``X`` is read (``iterator_train__*`` are
        ``DataLoader`` keywords): with ``num_workers >= 1``, loader processes
        read the examples of the coming updates while the current one
        computes (:class:`adadamp.examples.DatasetExamples`). Arrays and
        tensors are gathered from memory and ignore them.
    lr_scaling : {"none", "linear", "sqrt", "adascale"}, default="none"
        How the learning rate follows the batch size ``B`` of each update,
        relative to the base batch size ``B0``, the damper's ``initial``
        (the training-set size for ``GradientDescent``), with ``S = B / B0``:
        ``"none"`` keeps it; ``"linear"`` multiplies it by ``S`` (the rule for
        plain SGD); ``"sqrt"`` by ``sqrt(S)`` (the rule for Adam-type
        optimizers); ``"adascale"`` by AdaScale's gain
        ``r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2)`` in ``[1, S]``, from the
        gradient noise scale the engines estimate (:mod:`adadamp.gns`), the
        rule for SGD with momentum that adapts to the gradient's noise. With
        ``"adascale"`` an epoch's progress is counted on AdaScale's clock
        (each update counts ``r`` base batches, recorded as ``progress`` in
        ``history_``), and ``max_epochs`` is a budget on that clock: the fit
        runs epochs until the clock has advanced ``max_epochs`` (so possibly
        more epochs of data, at most 10 times as many). The factor multiplies
        the max-batch-size rule's.
    device : str, default="cpu"
        skorch's torch device; checked before any work (``"cuda"``, ``"cuda:1"``
        or ``"mps"`` on a machine without it raise ``ValueError``).
"""


class DaskClassifier(_DampedNetMixin, NeuralNetClassifier):
    __doc__ = (
        "Classifier over a PyTorch module that outputs logits (cross-entropy loss).\n"
        + _DAMPED_DOC
        + "\n    Other parameters are skorch's ``NeuralNetClassifier``'s.\n"
    )

    def __init__(
        self,
        module,
        *args,
        criterion=torch.nn.CrossEntropyLoss,
        batch_size=32,
        max_batch_size=None,
        grads_per_worker=32,
        min_workers=1,
        max_workers=None,
        worker_max_batch_size=None,
        backend="auto",
        client=None,
        random_state=None,
        lr_scaling="none",
        **kwargs,
    ):
        super().__init__(module, *args, criterion=criterion, batch_size=batch_size, **kwargs)
        self._init_damped_params(
            max_batch_size=max_batch_size,
            grads_per_worker=grads_per_worker,
            min_workers=min_workers,
            max_workers=max_workers,
            worker_max_batch_size=worker_max_batch_size,
            backend=backend,
            client=client,
            random_state=random_state,
            lr_scaling=lr_scaling,
        )

    _target_dtype = torch.long

    def check_data(self, X, y):
        super().check_data(X, y)
        # A dataset that names its targets (torchvision's, NpyDataset) gives its classes.
        targets = getattr(X, "targets", None) if y is None and is_dataset(X) else None
        if targets is not None:
            self.classes_inferred_ = np.unique(np.asarray(targets))


class DaskRegressor(_DampedNetMixin, NeuralNetRegressor):
    __doc__ = (
        "Regressor over a PyTorch module (mean squared error, no validation split).\n"
        + _DAMPED_DOC
        + "\n    Other parameters are skorch's ``NeuralNetRegressor``'s.\n"
    )

    def __init__(
        self,
        module,
        *args,
        criterion=torch.nn.MSELoss,
        train_split=None,
        batch_size=32,
        max_batch_size=None,
        grads_per_worker=32,
        min_workers=1,
        max_workers=None,
        worker_max_batch_size=None,
        backend="auto",
        client=None,
        random_state=None,
        lr_scaling="none",
        **kwargs,
    ):
        super().__init__(
            module,
            *args,
            criterion=criterion,
            train_split=train_split,
            batch_size=batch_size,
            **kwargs,
        )
        self._init_damped_params(
            max_batch_size=max_batch_size,
            grads_per_worker=grads_per_worker,
            min_workers=min_workers,
            max_workers=max_workers,
            worker_max_batch_size=worker_max_batch_size,
            backend=backend,
            client=client,
            random_state=random_state,
            lr_scaling=lr_scaling,
        )

    _target_dtype = None  # floating targets take the module's dtype

    def _check_target_shape(self, examples: Examples) -> None:
        # Elementwise losses broadcast (n, 1) predictions against (n,) targets
        # into an n x n comparison: training would run and learn the wrong thing.
        if not isinstance(self.criterion_, _ELEMENTWISE_LOSSES) or len(examples) == 0:
            return
        X, y = self._first_example(examples)
        n = len(examples)
        module = self.module_
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(X.to(self.device))
        finally:
            module.train(was_training)
        if isinstance(out, torch.Tensor) and out.shape[1:] != y.shape[1:]:
            hint = (
                ": reshape it with y.reshape(-1, 1)"
                if y.dim() == 1 and out.shape[1:] == (1,)
                else ""
            )
            raise ValueError(
                f"y has shape {(n,) + tuple(y.shape[1:])}, but the module outputs shape "
                f"{tuple(out.shape[1:])} per example, so y must have shape "
                f"{(n,) + tuple(out.shape[1:])}{hint}."
            )

    def get_loss(self, y_pred, y_true, *args, **kwargs):
        # Targets often arrive as float64 from scikit-learn; the module is float32.
        y_true = to_tensor(y_true, device=self.device)
        if y_true.is_floating_point():
            y_true = y_true.to(y_pred.dtype)
        return super().get_loss(y_pred, y_true, *args, **kwargs)
