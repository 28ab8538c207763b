"""Train PyTorch models faster on Dask by growing the batch size and the workers with it."""

from .dampers import (
    AdaDamp,
    CntsDampLR,
    GeoDamp,
    GeoDampLR,
    GradientDescent,
    PadaDamp,
    RadaDamp,
)
from .exceptions import ConvergenceError

__all__ = [
    "AdaDamp",
    "CntsDampLR",
    "ConvergenceError",
    "DaskClassifier",
    "DaskRegressor",
    "GeoDamp",
    "GeoDampLR",
    "GradientDescent",
    "PadaDamp",
    "RadaDamp",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The estimators pull in skorch and scikit-learn (about 1.5 s). Dask
    # workers import this package for the engines alone: load them on use.
    if name in ("DaskClassifier", "DaskRegressor"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'adadamp' has no attribute {name!r}")
