"""What runs inside Dask worker processes, for both Dask engines.

A fit hands one :class:`FitPayload` (module, criterion, optimizer recipe
and the training examples) to the cluster, published under a name. Tasks carry only a
:class:`PayloadRef`; :func:`worker_model` fetches the payload the first time
a worker meets the fit and caches the worker's module, optimizer and data, so
the training set reaches each worker once per fit whatever Dask later does
with its replicas. Per update, only weights, gradients and indices travel.
"""

from __future__ import annotations

import copy
import ctypes
import platform
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .._wire import TensorsApart
from ..examples import Examples, close
from ._loop import RankModel
from .base import TrainConfig


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (``lr``, ...), without its parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@dataclass
class OptimizerRecipe:
    """How to rebuild an optimizer over another copy of the same module."""

    cls: type
    groups: list[dict]
    """Each group's hyper-parameters, with ``params`` as indices into ``module.parameters()``."""

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, module: nn.Module) -> OptimizerRecipe:
        index = {id(p): i for i, p in enumerate(module.parameters())}
        groups = [
            {**settings, "params": [index[id(p)] for p in g["params"]]}
            for settings, g in zip(optimizer_settings(optimizer), optimizer.param_groups)
        ]
        return cls(type(optimizer), groups)

    def build(self, module: nn.Module) -> torch.optim.Optimizer:
        params = list(module.parameters())
        groups = [{**g, "params": [params[i] for i in g["params"]]} for g in self.groups]
        return self.cls(groups)


@dataclass
class FitPayload(TensorsApart):
    """Everything a worker needs for a fit, sent once per worker."""

    fit_id: str
    module: nn.Module
    criterion: nn.Module
    optimizer: OptimizerRecipe
    examples: Examples
    config: TrainConfig


@dataclass(frozen=True)
class PayloadRef:
    """A task's handle on a fit's payload: its fit id and the name it is published under.

    A name, not the future's key: Dask replaces task arguments equal to a key
    with that key's data, which would ship the payload with every task.
    """

    fit_id: str
    name: str


@dataclass
class WorkerModel(RankModel):
    """A worker's own module, optimizer and data for one fit."""

    state_token: tuple | None = None
    """``(token, with_optimizer)`` of the state the module holds now (see :func:`load_state`)."""


_MODELS: dict[str, WorkerModel] = {}
# fit id -> how many times the payload was fetched by this worker process
# (once per fit, unless the fit was released): lets tests count transfers.
_ARRIVALS: dict[str, int] = defaultdict(int)
# Fits released on this worker (one id per fit): a build that finishes later is not kept.
_RELEASED: set[str] = set()


_ALLOCATOR_TUNED = False
# One build per fit and process, even when a worker with several threads runs
# a warm-up task and a fit's first task at once.
_BUILD_LOCK = threading.Lock()


def _keep_large_buffers_mapped() -> None:
    """Stop glibc from unmapping every large buffer as soon as it is freed.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, under which
    glibc serves each buffer of 128 KiB or more with a fresh ``mmap``: every
    update's activations and gradients are then page-faulted in again
    (thousands of faults per update for a model of a few million weights,
    25% of its update time). Memory still goes back to the system when a fit
    is released (:func:`release`).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or platform.libc_ver()[0] != "glibc":
        return
    _ALLOCATOR_TUNED = True
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 128 << 20)


def _fetch(ref: PayloadRef) -> FitPayload:
    from distributed import get_client

    return get_client().get_dataset(ref.name).result()


def worker_model(ref: PayloadRef, payload: FitPayload | None = None) -> WorkerModel:
    """This worker's model for a fit, built from the payload on first use.

    ``payload``: the payload itself, when the task was given it as an
    argument; otherwise it is fetched by name, only if the model is built.
    """
    model = _MODELS.get(ref.fit_id)
    if model is not None:
        return model
    with _BUILD_LOCK:
        model = _MODELS.get(ref.fit_id)
        if model is None:
            model = _build_model(ref, payload)
            if ref.fit_id not in _RELEASED:  # a warm-up that outlived its fit keeps nothing
                _MODELS[ref.fit_id] = model
    return model


def warm(ref: PayloadRef, payload: FitPayload) -> None:
    """Build this worker's model for a fit ahead of its first task.

    A worker that joins mid-fit otherwise pays, in the first task of its
    first segment, for importing torch and building the module and data
    (seconds), while every other rank of that segment waits for it. The
    payload comes as the task's argument, which Dask places with the task:
    fetching it by name from inside the task took 25 ms for a task of 7 ms.
    """
    worker_model(ref, payload)


def _build_model(ref: PayloadRef, payload: FitPayload | None = None) -> WorkerModel:
    _keep_large_buffers_mapped()
    if payload is None:
        payload = _fetch(ref)
    _ARRIVALS[ref.fit_id] += 1
    device = torch.device(payload.config.device)
    # The payload may be the very object Dask holds for other workers to fetch: copy, not mutate.
    module = copy.deepcopy(payload.module).to(device)
    return WorkerModel(
        module=module,
        optimizer=payload.optimizer.build(module),
        criterion=copy.deepcopy(payload.criterion).to(device),
        examples=payload.examples.to(device),
        config=payload.config,
    )


def load_state(model: WorkerModel, module_state: dict, optimizer_state: dict | None, token) -> None:
    """Make the worker's module (and optimizer, if given) hold a state, unless it already does.

    ``model.state_token`` is ``(token, with_optimizer)``: a module loaded with
    weights alone does not count as holding that state's optimizer state.
    """
    held = model.state_token
    if held is not None and held[0] == token and (optimizer_state is None or held[1]):
        return
    model.module.load_state_dict(module_state)
    if optimizer_state is not None:
        model.optimizer.load_state_dict(optimizer_state)
    model.state_token = (token, optimizer_state is not None)


def export_state(model: WorkerModel) -> tuple[dict, dict]:
    """Copies of the module's and optimizer's state, safe to keep while training goes on."""
    module_state = {
        k: v.detach().to("cpu", copy=True) for k, v in model.module.state_dict().items()
    }
    optimizer_state = copy.deepcopy(model.optimizer.state_dict())
    return module_state, optimizer_state


# token -> the listening socket a segment's rendezvous store will take over.
_RENDEZVOUS: dict[str, socket.socket] = {}


def open_rendezvous(token: str, dask_worker) -> tuple[str, int]:
    """Bind a listening socket for a segment's store on this worker's own address.

    Run with ``client.run``, which hands the worker in as ``dask_worker``: a
    call, where a task's round trip waits on Dask's batched messages (10 to
    20 ms). The address is the one Dask reaches this worker at, not every interface;
    the socket stays bound until rank 0 hands it to ``torch.distributed.TCPStore``
    (:func:`take_rendezvous`), so no other process can take the port between
    choosing and listening. Returns ``(host, port)`` for the other ranks.
    """
    from urllib.parse import urlparse

    host = urlparse(dask_worker.address).hostname or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    _RENDEZVOUS[token] = sock
    return host, sock.getsockname()[1]


def take_rendezvous(token: str) -> socket.socket:
    """The socket :func:`open_rendezvous` bound for ``token`` (the caller closes or detaches it)."""
    return _RENDEZVOUS.pop(token)


def data_arrivals(fit_id: str) -> int:
    """How many times a fit's payload has arrived on this worker."""
    return _ARRIVALS.get(fit_id, 0)


def fits_held() -> list[str]:
    """The fits whose model this worker holds (none, once every fit was released)."""
    return list(_MODELS)


async def release_soon(fit_id: str) -> None:
    """:func:`release`, as a coroutine: ``client.run`` need not wait for it (a busy worker)."""
    release(fit_id)


def release(fit_id: str) -> None:
    """Forget a finished fit's module and data, and give the memory back."""
    _RELEASED.add(fit_id)
    model = _MODELS.pop(fit_id, None)
    if model is not None:
        close(model.examples)  # loader processes, if the examples started any
    for token in [t for t in _RENDEZVOUS if t.startswith(fit_id)]:
        _RENDEZVOUS.pop(token).close()
    if _ALLOCATOR_TUNED:
        ctypes.CDLL(None).malloc_trim(0)
