"""What crosses Dask with tensors in it (adadamp._wire): bytes out of band, values back equal."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from distributed.protocol import pickle as dask_pickle
from estimator_helpers import MLP

from adadamp._wire import Sealed, TensorsApart
from adadamp.engines._worker import FitPayload, OptimizerRecipe
from adadamp.engines.base import TrainConfig
from adadamp.examples import TensorExamples


def _through_dask(value):
    """``value`` pickled and unpickled as Dask does; the bytes in band and out of band."""
    buffers: list = []
    frame = dask_pickle.dumps(value, buffer_callback=buffers.append, protocol=5)
    back = dask_pickle.loads(frame, buffers=buffers)
    return back, len(frame), sum(memoryview(b).nbytes for b in buffers)


@dataclass
class _Carrier(TensorsApart):
    module_state: dict
    optimizer_state: dict
    note: str


def test_state_dicts_cross_out_of_band_and_come_back_equal():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    module_state, optimizer_state = module.state_dict(), optimizer.state_dict()
    back, in_band, out_of_band = _through_dask(_Carrier(module_state, optimizer_state, "x"))
    assert back.note == "x"
    assert back.module_state.keys() == module_state.keys()
    for key, value in module_state.items():
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
    assert out_of_band >= sum(v.nbytes for v in module_state.values())
    back.module_state["0.weight"] += 1  # writable, as a state to load from must be


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_payload_sends_its_examples_and_weights_out_of_band(dtype):
    module = MLP(hidden=64).to(dtype)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    X, y = torch.randn(4096, 64).to(dtype), torch.arange(4096)
    payload = FitPayload(
        fit_id="f",
        module=copy.deepcopy(module),
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=OptimizerRecipe.of(optimizer, module),
        examples=TensorExamples(X, y),
        config=TrainConfig(seed=0),
    )
    back, in_band, out_of_band = _through_dask(payload)
    assert torch.equal(back.examples.X, X) and torch.equal(back.examples.y, y)
    assert back.examples.X.dtype == dtype
    for mine, theirs in zip(back.module.parameters(), module.parameters()):
        assert isinstance(mine, torch.nn.Parameter) and torch.equal(mine, theirs)
    weights = sum(p.nbytes for p in module.parameters())
    # Tensors pickled in band would put every byte in the frame (tens of ms per hop).
    assert out_of_band >= X.nbytes + y.nbytes + weights
    assert in_band < 20_000


def test_views_and_tied_weights_keep_sharing_their_storage():
    base = torch.arange(24.0).reshape(4, 6)
    tied = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(tied, torch.nn.ReLU(), tied)
    values = {"base": base, "t": base.t(), "every_other": base[::2], "model": model}
    back = _through_dask(_Carrier(values, {}, ""))[0].module_state
    for key in ("base", "t", "every_other"):
        assert torch.equal(back[key], values[key])
    back["base"][0, 0] = -1.0
    assert back["t"][0, 0] == -1.0 and back["every_other"][0, 0] == -1.0
    assert back["model"][0].weight is back["model"][2].weight


def test_numpy_arrays_inside_travel_out_of_band_too():
    array = np.arange(100_000, dtype=np.float64)
    back, in_band, out_of_band = _through_dask(_Carrier({"a": array}, {}, ""))
    assert np.array_equal(back.module_state["a"], array)
    assert out_of_band >= array.nbytes and in_band < 10_000


def test_a_module_class_from_the_users_script_is_pickled_once(monkeypatch):
    """Dask pickles a value a second time, with cloudpickle, when its pickle holds "__main__"."""
    import adadamp._wire as wire

    # A class defined in the script that fits: cloudpickle sends it by value.
    ScriptNet = type("ScriptNet", (torch.nn.Linear,), {"__module__": "__main__"})
    picklings = []
    real = wire.dumps_apart
    monkeypatch.setattr(wire, "dumps_apart", lambda value: picklings.append(1) or real(value))
    module = ScriptNet(4, 2)
    back = _through_dask(_Carrier({"module": module}, {}, ""))[0].module_state["module"]
    assert len(picklings) == 1
    assert type(back).__name__ == "ScriptNet"
    assert torch.equal(back.weight, module.weight)


def _refuse_to_unpickle():
    raise RuntimeError("unpickled")


class _OnlyOpenedOnWorkers:
    """Stands for a class the scheduler cannot import: unpickling it fails."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def test_a_sealed_value_is_relayed_without_being_unpickled():
    weights = torch.randn(512, 256)
    sealed = Sealed({"module": _OnlyOpenedOnWorkers(), "weights": weights})
    relayed, in_band, out_of_band = _through_dask(sealed)  # no error: not unpickled
    assert out_of_band >= weights.nbytes and in_band < 5_000
    with pytest.raises(RuntimeError, match="unpickled"):
        relayed.open()
    opened = _through_dask(Sealed({"weights": weights}))[0].open()
    assert torch.equal(opened["weights"], weights)


def test_over_a_protocol_4_connection_the_arrays_still_travel_as_frames():
    """Dask's scheduler pickles with protocol 4 (no out-of-band buffers) on its connections."""
    from distributed.protocol import dumps, loads, to_serialize

    weights = {"w": torch.randn(256, 1024), "scalar": torch.tensor(3.0)}
    array = np.arange(50_000, dtype=np.int64)[::2]  # not contiguous
    message = {"result": to_serialize(_Carrier(weights, {"a": array}, "x"))}
    frames = dumps(message, context={"pickle-protocol": 4})
    sizes = [memoryview(f).nbytes for f in frames]
    # The arrays' bytes are frames of their own, not inside a pickle: what
    # is left beside them is a few kilobytes.
    assert weights["w"].nbytes in sizes and array.nbytes in sizes
    assert sum(sizes) - weights["w"].nbytes - array.nbytes < 20_000
    back = loads(frames)["result"]
    assert back.note == "x"
    assert torch.equal(back.module_state["w"], weights["w"])
    assert torch.equal(back.module_state["scalar"], weights["scalar"])
    assert back.module_state["scalar"].shape == ()
    assert np.array_equal(back.optimizer_state["a"], array)
    back.module_state["w"] += 1  # writable, as a state to load from must be


def test_arrays_received_at_any_offset_in_a_message_come_back_aligned():
    """A connection reads a message into one buffer and slices its frames out of it."""
    from distributed.protocol import dumps, loads, to_serialize

    weights = {"w": torch.randn(1000), "d": torch.randn(10, dtype=torch.float64)}
    frames = dumps({"result": to_serialize(_Carrier(weights, {}, ""))})
    received = bytearray(b"x" + b"".join(bytes(f) for f in frames))  # an odd start
    views, at = [], 1
    for frame in frames:
        views.append(memoryview(received)[at : at + memoryview(frame).nbytes])
        at += memoryview(frame).nbytes
    back = loads(views)["result"]
    for key, value in weights.items():
        assert back.module_state[key].data_ptr() % 16 == 0, key
        assert torch.equal(back.module_state[key], value)
