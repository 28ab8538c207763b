"""Engines compute model updates; the estimators choose one with ``backend``."""
from __future__ import annotations

from .base import Engine, TrainConfig, UpdateRecord

BACKENDS = ("auto", "local", "centralized", "decentralized")

__all__ = ["BACKENDS", "Engine", "TrainConfig", "UpdateRecord", "make_engine"]


def make_engine(backend: str, config: TrainConfig, client=None) -> Engine:
    """The engine for ``backend`` (``"auto"`` must be resolved by the caller)."""
    if backend == "local":
        from .local import LocalEngine

        return LocalEngine(config)
    if backend == "centralized":
        from .centralized import CentralizedEngine

        return CentralizedEngine(config, client)
    if backend == "decentralized":
        from .decentralized import DecentralizedEngine

        return DecentralizedEngine(config, client)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
