"""Pickling for what crosses Dask with tensors in it: their bytes out of band.

Dask pickles NumPy arrays out of band: their bytes go to the socket as they
are, with no copy and no pass over them. Torch tensors it pickles in band,
through torch's own reduction, at every hop (client, scheduler, worker):
4 MB of examples took 33 ms to reach a worker as tensors, 13 ms as arrays.
:func:`dumps_apart` pickles an object as usual but for the tensors'
storages (and NumPy arrays), which it hands over as arrays to send beside
the pickle, as ``torch.save`` keeps storages beside its pickle; tensors,
their dtypes, views and shared storages (tied weights) come back as they
were. Dataclasses that carry weights, optimizer states or the training set
to and from the workers pickle this way (:class:`TensorsApart`).

Out of band needs pickle protocol 5, and Dask's scheduler pickles with
protocol 4 on every connection it has. So a :class:`TensorsApart` is also
a Dask serializer of its own, which sends its arrays' bytes as frames
beside the pickle over any connection: what Dask serializes on its way
through the scheduler (a ``client.run`` result, a task's result the client
gathers) would otherwise be pickled in band, its bytes copied at every
pickling and scanned by Dask for ``__main__``. A 10 MB hand-off took 38 ms
to reach the client from a worker's ``client.run`` pickled, 16 ms as frames.
A value that only the workers should unpickle (a fit's payload) travels
:class:`Sealed`.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any

import cloudpickle
import numpy as np
import torch
from distributed.protocol import dask_deserialize, dask_serialize

# Bytes: the strictest alignment a tensor's or array's element type needs.
_ALIGNMENT = 16


class _Pickler(cloudpickle.Pickler):
    """Pickles CPU storages and NumPy arrays as references into ``self.arrays``."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.arrays: list[np.ndarray] = []
        self._storages: dict[tuple[int, int], int] = {}  # (address, bytes) -> index

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            untyped = obj._untyped_storage
            if untyped.device.type != "cpu" or not untyped.nbytes():
                return None
            key = (untyped.data_ptr(), untyped.nbytes())
            if key not in self._storages:  # one array per storage: views keep sharing it
                self._storages[key] = len(self.arrays)
                self.arrays.append(torch.empty(0, dtype=torch.uint8).set_(untyped).numpy())
            return ("storage", self._storages[key], obj.dtype)
        if type(obj) is np.ndarray and obj.dtype != object:
            self.arrays.append(obj)
            return ("array", len(self.arrays) - 1, None)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: list[np.ndarray]):
        super().__init__(file)
        self.arrays = arrays
        self._storages: dict[int, torch.UntypedStorage] = {}

    def persistent_load(self, pid: Any) -> Any:
        kind, index, dtype = pid
        array = self.arrays[index]
        # A received buffer may be read-only, or start anywhere in the message
        # it came in (a connection slices each frame out of one buffer): a
        # copy is writable and aligned for any dtype.
        if not array.flags.writeable or array.ctypes.data % _ALIGNMENT:
            array = self.arrays[index] = array.copy()
        if kind == "array":
            return array
        if index not in self._storages:
            self._storages[index] = torch.from_numpy(array).untyped_storage()
        return torch.storage.TypedStorage(
            wrap_storage=self._storages[index], dtype=dtype, _internal=True
        )


def dumps_apart(value: Any) -> tuple[bytes, list[np.ndarray]]:
    """``value`` pickled without its tensors' and arrays' bytes, and those bytes as arrays."""
    file = io.BytesIO()
    pickler = _Pickler(file)
    pickler.dump(value)
    return file.getvalue(), pickler.arrays


def loads_apart(data: bytes, arrays: list[np.ndarray]) -> Any:
    """The value :func:`dumps_apart` gave ``data`` and ``arrays`` for."""
    return _Unpickler(io.BytesIO(data), list(arrays)).load()


class TensorsApart:
    """A dataclass that pickles through :func:`dumps_apart` (see the module)."""

    def __reduce__(self):
        # Sealed, the fields' pickle is an array, out of band like the
        # tensors. In band, it would hold the text "__main__" whenever a
        # field's class comes from the user's script (cloudpickle pickled it
        # by value), and Dask, finding that text in a pickle, pickles the
        # whole value again.
        return (_rebuild, (type(self), Sealed(_fields(self))))


class Sealed:
    """A value pickled apart (:func:`dumps_apart`), carried unopened until :meth:`open`.

    Dask's scheduler unpickles every task's arguments and pickles them again
    for the worker that runs the task: a value handed to the cluster in a
    task (a fit's payload: its model, a class from the user's script pickled
    by value, and the training data) was rebuilt and pickled anew there.
    Sealed, it is only arrays to the scheduler, relayed out of band; only the
    worker that opens it unpickles it, and the scheduler needs none of the
    classes inside it.
    """

    def __init__(self, value: Any):
        data, self.arrays = dumps_apart(value)
        self.data = np.frombuffer(data, dtype=np.uint8)

    def open(self) -> Any:
        return loads_apart(bytes(self.data), self.arrays)


def _rebuild(cls: type, fields: Sealed) -> Any:
    return cls(**fields.open())


def _fields(value: Any) -> dict:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


@dask_serialize.register(TensorsApart)
def _dask_dumps(value: TensorsApart) -> tuple[dict, list]:
    data, arrays = dumps_apart(_fields(value))
    head = pickle.dumps((type(value), [(a.dtype, a.shape) for a in arrays]))
    return {}, [head, data, *(_raw_bytes(a) for a in arrays)]


@dask_deserialize.register(TensorsApart)
def _dask_loads(header: dict, frames: list) -> TensorsApart:
    head, data, *buffers = frames
    cls, layouts = pickle.loads(head)
    arrays = [
        np.frombuffer(buffer, dtype=np.uint8).view(dtype).reshape(shape)
        for (dtype, shape), buffer in zip(layouts, buffers)
    ]
    return cls(**loads_apart(bytes(data), arrays))


def _raw_bytes(array: np.ndarray) -> memoryview:
    """An array's bytes, in C order, as a flat byte view (a copy only if not contiguous)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
