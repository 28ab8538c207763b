"""Train PyTorch models faster on Dask by growing the batch size and the workers with it."""
from .dampers import GeoDamp, GeoDampLR
from .exceptions import ConvergenceError

__all__ = ["ConvergenceError", "GeoDamp", "GeoDampLR"]
__version__ = "0.1.0"
