"""Engines compute model updates; the estimators choose one with ``backend``."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Engine, TrainConfig, UpdateRecord

BACKENDS = ("auto", "local", "centralized", "decentralized")

# Each engine is imported when it is used: the Dask ones pull in distributed.
_ENGINES = {
    "local": ("local", "LocalEngine"),
    "centralized": ("centralized", "CentralizedEngine"),
    "decentralized": ("decentralized", "DecentralizedEngine"),
}

__all__ = ["BACKENDS", "Engine", "TrainConfig", "UpdateRecord", "check_backend", "resolve_engine"]


def check_backend(backend: Any) -> None:
    """Raise ``ValueError`` unless ``backend`` names an engine or is an Engine class or instance."""
    if isinstance(backend, Engine) or (isinstance(backend, type) and issubclass(backend, Engine)):
        return
    if isinstance(backend, str) and backend in BACKENDS:
        return
    raise ValueError(
        f"backend must be one of {BACKENDS}, an Engine subclass or an Engine instance, "
        f"got {backend!r}."
    )


def resolve_engine(backend: Any, client: Any = None) -> Engine:
    """The engine a fit runs on.

    ``"auto"`` is ``"decentralized"`` when a ``client`` is given or this
    process has a current Dask client (:func:`adadamp.cluster.current_client`),
    else ``"local"``. An ``Engine`` class is instantiated without arguments;
    an instance is used as it is (skorch treats its components the same way).
    """
    check_backend(backend)
    if isinstance(backend, Engine):
        return backend
    if isinstance(backend, type):
        return backend()
    if backend == "auto":
        from ..cluster import current_client  # imports distributed: only for "auto"

        backend = "decentralized" if client is not None or current_client() is not None else "local"
    module_name, class_name = _ENGINES[backend]
    return getattr(importlib.import_module(f".{module_name}", __name__), class_name)()
