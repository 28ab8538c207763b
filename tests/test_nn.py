import pytest
import torch
from torch import nn

from adadamp.nn import GhostBatchNorm

BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
SHAPES = {2: (6,), 3: (6, 5), 4: (6, 3, 4)}  # everything after N; C = 6


def _input(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # An offset and a scale far from (0, 1), so normalization visibly acts.
    return 3.0 + 2.5 * torch.randn(n, *SHAPES[dim], generator=gen)


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (C, N * prod(*)): one row per channel."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _reference(x, weight, bias, n_chunks, eps=1e-5):
    """Ghost batch norm written out with plain tensor ops, as an oracle."""
    out = []
    for chunk in torch.tensor_split(x, n_chunks):
        dims = [0] + list(range(2, x.dim()))
        mean = chunk.mean(dim=dims, keepdim=True)
        var = chunk.var(dim=dims, unbiased=False, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out.append((chunk - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape))
    return torch.cat(out)


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("n, vbs", [(64, 16), (50, 16), (40, 7)])
def test_each_ghost_batch_is_normalized(dim, n, vbs):
    x = _input(n, dim)
    gbn = GhostBatchNorm(6, virtual_batch_size=vbs).train()
    y = gbn(x)
    assert y.shape == x.shape
    chunks = torch.tensor_split(y, gbn.num_chunks(n))
    assert len(chunks) == -(-n // vbs)
    assert sum(len(c) for c in chunks) == n
    for chunk in chunks:
        assert len(chunk) <= vbs
        rows = _per_channel(chunk)
        torch.testing.assert_close(rows.mean(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
        var = rows.var(dim=1, unbiased=False)
        torch.testing.assert_close(var, torch.ones(6), atol=1e-3, rtol=0)
    # The whole batch is not normalized with one set of statistics: a chunk's
    # mean differs from the batch's, so the output differs from batch norm's.
    bn = BATCH_NORMS[dim](6).train()
    assert not torch.allclose(y, bn(x), atol=1e-4)


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_match_batch_norm_fed_the_chunks(dim, momentum):
    gbn = GhostBatchNorm(6, virtual_batch_size=8, momentum=momentum).train()
    bn = BATCH_NORMS[dim](6, momentum=momentum).train()
    for seed, n in enumerate([32, 29, 8, 3]):
        x = _input(n, dim, seed=seed)
        y = gbn(x)
        expected = torch.cat([bn(c) for c in torch.tensor_split(x, gbn.num_chunks(n))])
        torch.testing.assert_close(y, expected)
    torch.testing.assert_close(gbn.running_mean, bn.running_mean)
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 4 + 4 + 1 + 1


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("vbs", [20, 21, 1000])
def test_equals_batch_norm_when_virtual_batch_covers_the_batch(dim, vbs):
    torch.manual_seed(0)
    gbn = GhostBatchNorm(6, virtual_batch_size=vbs)
    bn = BATCH_NORMS[dim](6)
    with torch.no_grad():  # non-trivial affine parameters, identical in both
        gbn.weight.uniform_(0.5, 2.0)
        gbn.bias.normal_()
        bn.weight.copy_(gbn.weight)
        bn.bias.copy_(gbn.bias)
    x1 = _input(20, dim).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(20, *SHAPES[dim])
    for _ in range(3):
        y_g, y_b = gbn(x1), bn(x2)
        torch.testing.assert_close(y_g, y_b)
        (y_g * g).sum().backward()
        (y_b * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(gbn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(gbn.bias.grad, bn.bias.grad)
    torch.testing.assert_close(gbn.running_mean, bn.running_mean)
    torch.testing.assert_close(gbn.running_var, bn.running_var)
    assert int(gbn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    gbn.eval(), bn.eval()
    torch.testing.assert_close(gbn(x1), bn(x2))


def test_state_dict_is_interchangeable_with_batch_norm():
    bn = nn.BatchNorm2d(6)
    bn(_input(32, 4))
    gbn = GhostBatchNorm(6, virtual_batch_size=4)
    gbn.load_state_dict(bn.state_dict())
    bn.load_state_dict(gbn.state_dict())
    bn.eval(), gbn.eval()
    x = _input(10, 4, seed=1)
    torch.testing.assert_close(gbn(x), bn(x))


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_eval_mode_uses_running_stats(dim):
    gbn = GhostBatchNorm(6, virtual_batch_size=8)
    for seed in range(5):
        gbn(_input(32, dim, seed=seed))
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 2.0)
        gbn.bias.normal_()
    gbn.eval()
    state = {k: v.clone() for k, v in gbn.state_dict().items()}
    x = _input(10, dim, seed=99)
    y = gbn(x)
    shape = (1, -1) + (1,) * (dim - 2)
    expected = (x - gbn.running_mean.view(shape)) / torch.sqrt(
        gbn.running_var.view(shape) + gbn.eps
    ) * gbn.weight.view(shape) + gbn.bias.view(shape)
    torch.testing.assert_close(y, expected)
    # Each example is normalized alone: no dependence on the rest of the batch.
    torch.testing.assert_close(gbn(x[:1]), y[:1])
    # Evaluation leaves the running statistics alone.
    for k, v in gbn.state_dict().items():
        torch.testing.assert_close(v, state[k])


@pytest.mark.parametrize("dim", [2, 4])
def test_gradients_match_the_written_out_formula(dim):
    torch.manual_seed(0)
    gbn = GhostBatchNorm(6, virtual_batch_size=8)
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 2.0)
        gbn.bias.normal_()
    weight = gbn.weight.detach().clone().requires_grad_()
    bias = gbn.bias.detach().clone().requires_grad_()
    x1 = _input(30, dim).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(30, *SHAPES[dim])

    (gbn(x1) * g).sum().backward()
    (_reference(x2, weight, bias, n_chunks=4) * g).sum().backward()

    assert gbn.weight.grad is not None and gbn.weight.grad.abs().sum() > 0
    assert gbn.bias.grad is not None and gbn.bias.grad.abs().sum() > 0
    torch.testing.assert_close(gbn.weight.grad, weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gbn.bias.grad, bias.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)


def test_micro_batches_that_are_multiples_of_the_virtual_batch_size():
    # The estimators call forward once per micro-batch; ghost batches are
    # formed within each call. With micro-batches a multiple of the virtual
    # batch size, the ghost batches are the same as with one call.
    x = _input(96, 4)
    whole = GhostBatchNorm(6, virtual_batch_size=16)
    split = GhostBatchNorm(6, virtual_batch_size=16)
    y_whole = whole(x)
    y_split = torch.cat([split(mb) for mb in x.split(32)])
    torch.testing.assert_close(y_split, y_whole)
    torch.testing.assert_close(split.running_mean, whole.running_mean)
    torch.testing.assert_close(split.running_var, whole.running_var)
    assert int(split.num_batches_tracked) == int(whole.num_batches_tracked) == 6


def test_without_affine():
    gbn = GhostBatchNorm(6, virtual_batch_size=8, affine=False)
    assert gbn.weight is None and gbn.bias is None
    assert list(gbn.parameters()) == []
    x = _input(16, 3)
    torch.testing.assert_close(gbn(x), _reference(x, torch.ones(6), torch.zeros(6), 2))


@pytest.mark.parametrize("vbs", [0, -1, -32])
def test_virtual_batch_size_below_one_raises(vbs):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm(4, virtual_batch_size=vbs)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_features": 0}, ValueError),
        ({"num_features": 4, "virtual_batch_size": 2.5}, TypeError),
        ({"num_features": 4, "virtual_batch_size": True}, TypeError),
        ({"num_features": 4, "momentum": 1.5}, ValueError),
        ({"num_features": 4, "eps": 0.0}, ValueError),
    ],
)
def test_bad_arguments_raise(kwargs, error):
    with pytest.raises(error):
        GhostBatchNorm(**kwargs)


def test_bad_inputs_raise():
    gbn = GhostBatchNorm(6)
    with pytest.raises(ValueError, match="num_features=6"):
        gbn(torch.randn(8, 5, 3))
    with pytest.raises(ValueError, match="5-D"):
        gbn(torch.randn(8, 6, 2, 2, 2))
