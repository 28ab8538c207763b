"""Checks of parameter values, shared by the dampers and the estimators.

Each message names the owner and the parameter, because the message is what
a user of ``batch_size__<name>=...`` or of an estimator parameter sees.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_int(value: Any) -> bool:
    # bool is an int subclass, but ``workers=True`` is a mistake, not a 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real number, bools excluded (``factor=True`` is a mistake, not a 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: Any, owner: str) -> None:
    if not (is_real(value) and value > 0):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}.")


def check_at_least(name: str, value: Any, low: float, owner: str) -> None:
    if not (is_real(value) and value >= low):
        raise ValueError(f"{owner}: {name} must be a finite number >= {low}, got {value!r}.")


def check_int_at_least(name: str, value: Any, low: int, owner: str) -> None:
    if not (is_int(value) and value >= low):
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}.")


def check_finite(name: str, value: Any, owner: str) -> None:
    if not is_real(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}.")
