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
from .estimators import DaskClassifier, DaskRegressor
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
