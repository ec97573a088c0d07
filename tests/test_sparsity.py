"""Penalties, the alpha schedule and activation capture."""
import pytest
import torch
from torch import nn

from d2dmoe.moe import FFN
from d2dmoe.sparsity import alpha_at, capture_activations, l1, penalty, square_hoyer


def test_square_hoyer_bounds():
    n = 37
    one_hot = torch.zeros(n)
    one_hot[5] = 3.0
    assert square_hoyer(one_hot).item() == pytest.approx(1.0, rel=1e-6)
    assert square_hoyer(torch.full((n,), 0.7)).item() == pytest.approx(n, rel=1e-6)
    x = torch.rand(100, n)
    h = square_hoyer(x)
    assert (h >= 1 - 1e-5).all() and (h <= n + 1e-4).all()


def test_square_hoyer_counts_negative_activations_by_magnitude():
    """With sparsity.activation=keep (GELU) activations are negative too: the measure is of |a|."""
    a = torch.tensor([[1.0, -1.0, 0.0, 0.0], [2.0, 0.0, -0.5, 0.0]])
    torch.testing.assert_close(square_hoyer(a), torch.tensor([4.0 / 2.0, 2.5 ** 2 / 4.25]))
    torch.testing.assert_close(square_hoyer(-a), square_hoyer(a))


def test_l1_per_token():
    a = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 0.0]])
    assert torch.equal(l1(a), torch.tensor([3.0, 1.0]))


def test_penalty_ignores_padding_and_averages_layers():
    a1 = torch.tensor([[[1.0, 0, 0], [1.0, 1, 1]]])  # token 0 one-hot (H=1), token 1 uniform (H=3)
    a2 = torch.tensor([[[1.0, 1, 0], [5.0, 5, 5]]])  # token 0 H=2
    mask = torch.tensor([[1, 0]])  # the second token is padding
    assert penalty([a1, a2], mask, "hoyer").item() == pytest.approx((1 + 2) / 2, rel=1e-6)
    assert penalty([a1], torch.ones(1, 2), "hoyer").item() == pytest.approx((1 + 3) / 2, rel=1e-6)
    assert penalty([a1], mask, "l1").item() == pytest.approx(1.0)


def test_alpha_schedules():
    assert alpha_at(0.2, "linear_warmup", 0, 100) == 0
    assert alpha_at(0.2, "linear_warmup", 25, 100) == pytest.approx(0.1)
    assert alpha_at(0.2, "linear_warmup", 50, 100) == pytest.approx(0.2)
    assert alpha_at(0.2, "linear_warmup", 90, 100) == pytest.approx(0.2)
    assert alpha_at(0.2, "linear", 25, 100) == pytest.approx(0.05)
    assert alpha_at(0.2, "constant", 0, 100) == 0.2
    with pytest.raises(ValueError, match="sparsity.schedule"):
        alpha_at(0.2, "cosine", 0, 10)


def test_capture_activations_records_each_ffn_and_cleans_up():
    model = nn.Sequential(FFN(nn.Linear(4, 8), nn.Linear(8, 4), nn.ReLU()),
                          FFN(nn.Linear(4, 6), nn.Linear(6, 4), nn.ReLU()))
    x = torch.randn(2, 3, 4)
    with capture_activations(model) as acts:
        model(x)
    assert [a.shape for a in acts] == [(2, 3, 8), (2, 3, 6)]
    assert (acts[0] >= 0).all()
    model(x)
    assert len(acts) == 2  # hooks removed
