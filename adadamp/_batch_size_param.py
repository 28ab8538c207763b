"""The estimators' ``batch_size`` parameter, and the ``batch_size__*`` routed to it, as a damper."""

from __future__ import annotations

import copy
from typing import Any

from ._checks import is_int
from .dampers import BaseDamper, Constant

_ACCEPTED = (
    "an int >= 1, a damper class (e.g. GeoDamp) or a damper instance (e.g. GeoDamp(delay=60))"
)


def _check_param_keys(cls: type[BaseDamper], params: dict[str, Any]) -> None:
    accepted = cls.param_names()
    unknown = sorted(k for k in params if k not in accepted)
    if unknown:
        bad = ", ".join(f"batch_size__{k}" for k in unknown)
        allowed = (
            ", ".join(f"batch_size__{k}" for k in accepted)
            if accepted
            else f"none ({cls.__name__} takes no parameters)"
        )
        raise ValueError(f"{bad}: not a parameter of {cls.__name__}. Accepted: {allowed}.")


def resolve_damper(batch_size: Any, params: dict[str, Any] | None = None) -> BaseDamper:
    """Turn an estimator's ``batch_size`` parameter into a validated damper.

    Parameters
    ----------
    batch_size : int, BaseDamper subclass or BaseDamper instance
        An int ``b`` becomes ``Constant(b)``; a class is instantiated with
        ``params``; an instance is deep-copied (the caller's object is never
        changed) and ``params`` are set on the copy.
    params : dict, optional
        The ``batch_size__<name>`` parameters, keyed by ``<name>``.

    Returns
    -------
    BaseDamper
        A damper whose :meth:`~BaseDamper.validate` passed.

    Raises
    ------
    TypeError
        When ``batch_size`` is none of the accepted kinds.
    ValueError
        When an int is < 1, a key of ``params`` is not a constructor parameter
        of the damper, or a parameter is out of range.
    """
    params = dict(params or {})
    if is_int(batch_size):
        if params:
            keys = ", ".join(f"batch_size__{k}" for k in sorted(params))
            raise ValueError(
                f"{keys} given, but batch_size={batch_size!r} is an int; "
                "batch_size__* parameters apply only to a damper class or instance."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be {_ACCEPTED}; got {batch_size!r}.")
        damper: BaseDamper = Constant(int(batch_size))
    elif isinstance(batch_size, type) and issubclass(batch_size, BaseDamper):
        if batch_size is BaseDamper:
            raise TypeError(f"batch_size must be {_ACCEPTED}; BaseDamper itself has no policy.")
        _check_param_keys(batch_size, params)
        damper = batch_size(**params)
    elif isinstance(batch_size, BaseDamper):
        _check_param_keys(type(batch_size), params)
        damper = copy.deepcopy(batch_size)
        for key, value in params.items():
            setattr(damper, key, value)
    else:
        raise TypeError(
            f"batch_size must be {_ACCEPTED}; got {batch_size!r} "
            f"of type {type(batch_size).__name__}."
        )
    damper.validate()
    return damper
