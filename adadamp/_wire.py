"""Tensors that travel to and from Dask workers as NumPy arrays.

Dask pickles NumPy arrays out of band: their bytes go to the socket as they
are, with no copy and no pass over them. Torch tensors it pickles in band,
through torch's own reduction, at every hop (client, scheduler, worker):
4 MB of examples took 33 ms to reach a worker as tensors, 13 ms as arrays.
What carries weights, optimizer state or examples through Dask pickles its
tensors through :func:`to_wire` and rebuilds them with :func:`from_wire`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


class WireArray:
    """A tensor's data as a NumPy array, while pickled."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return (WireArray, (self.array,))


def to_wire(value: Any) -> Any:
    """``value`` with each plain CPU tensor in it (in dicts, lists, tuples) as a :class:`WireArray`.

    Tensors NumPy cannot view (bfloat16, on a GPU, needing gradients, a
    subclass such as ``nn.Parameter``) stay as they are.
    """
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor or value.device.type != "cpu":
            return value
        try:
            return WireArray(value.numpy())
        except (TypeError, RuntimeError):
            return value
    if isinstance(value, dict):
        out = type(value)((k, to_wire(v)) for k, v in value.items())
        metadata = getattr(value, "_metadata", None)  # a state_dict's versions
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if type(value) in (list, tuple):
        return type(value)(to_wire(v) for v in value)
    return value


def from_wire(value: Any) -> Any:
    """The inverse of :func:`to_wire` (arrays on a read-only buffer are copied)."""
    if isinstance(value, WireArray):
        array = value.array
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    if isinstance(value, dict):
        out = type(value)((k, from_wire(v)) for k, v in value.items())
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata  # type: ignore[attr-defined]
        return out
    if type(value) in (list, tuple):
        return type(value)(from_wire(v) for v in value)
    return value


class TensorsAsArrays:
    """A dataclass whose fields' tensors are pickled as NumPy arrays (see the module)."""

    def __reduce__(self):
        values = {f.name: to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return (_rebuild, (type(self), values))


def _rebuild(cls: type, values: dict) -> Any:
    return cls(**{name: from_wire(value) for name, value in values.items()})
