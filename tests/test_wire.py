"""Tensors sent through Dask as NumPy arrays (adadamp._wire): out of band, and back equal."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from distributed.protocol import pickle as dask_pickle

from adadamp._wire import TensorsAsArrays, from_wire, to_wire


def _through_dask(value):
    """``value`` pickled and unpickled as Dask does, and the bytes it sent out of band."""
    buffers: list = []
    frame = dask_pickle.dumps(value, buffer_callback=buffers.append, protocol=5)
    return dask_pickle.loads(frame, buffers=buffers), sum(memoryview(b).nbytes for b in buffers)


@dataclass
class _Carrier(TensorsAsArrays):
    module_state: dict
    optimizer_state: dict
    note: str


def _states():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    return module.state_dict(), optimizer.state_dict()


def test_state_dicts_cross_dask_out_of_band_and_come_back_equal():
    module_state, optimizer_state = _states()
    back, out_of_band = _through_dask(_Carrier(module_state, optimizer_state, "x"))
    assert back.note == "x"
    assert back.module_state.keys() == module_state.keys()
    for key, value in module_state.items():
        assert type(back.module_state[key]) is torch.Tensor
        assert torch.equal(back.module_state[key], value)
        assert back.module_state[key].dtype == value.dtype
    # A state dict's versions (read by load_state_dict) survive.
    assert back.module_state._metadata == module_state._metadata
    state, back_state = optimizer_state["state"], back.optimizer_state["state"]
    assert back_state.keys() == state.keys()  # integer keys stay integers
    for index, entry in state.items():
        for name, value in entry.items():
            assert torch.equal(back_state[index][name], value), name
    assert back.optimizer_state["param_groups"] == optimizer_state["param_groups"]
    floats = sum(v.nbytes for v in module_state.values() if v.dtype.is_floating_point)
    assert out_of_band >= floats
    back.module_state["0.weight"] += 1  # writable, as a state to load from must be


def test_tensors_numpy_cannot_view_stay_tensors():
    bf16 = torch.ones(3, dtype=torch.bfloat16)
    needs_grad = torch.ones(3, requires_grad=True)
    parameter = torch.nn.Parameter(torch.ones(3))
    for value in (bf16, needs_grad, parameter):
        assert to_wire(value) is value
    back = from_wire(to_wire({"a": [bf16, (parameter,)]}))
    assert back["a"][0] is bf16 and back["a"][1][0] is parameter


@pytest.mark.parametrize("make", [lambda t: t, lambda t: t.t(), lambda t: t[::2]])
def test_strided_views_come_back_with_their_values(make):
    tensor = make(torch.arange(24.0).reshape(4, 6))
    back = from_wire(_through_dask(to_wire(tensor))[0])
    assert torch.equal(back, tensor)
