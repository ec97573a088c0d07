"""Router losses on hand-computed examples: D2DMoE's regression and MoEfication's BCE."""
import math

import torch
from torch import nn

from d2dmoe.moe import FFN, MoE, Router
from d2dmoe.phases.routers import moefication_loss, moefication_target, regression_loss


def two_expert_moe(kind: str) -> MoE:
    """d=2, d_ff=4, two experts of two neurons; W1 = identity-like, W2 = identity-like."""
    w1 = nn.Linear(2, 4, bias=False)
    w2 = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        w1.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]))
        w2.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
    router = Router(2, 2, hidden=3, kind=kind)
    return MoE.from_ffn(FFN(w1, w2, nn.ReLU()), [torch.tensor([0, 1]), torch.tensor([2, 3])], router)


def test_moefication_target_is_each_experts_activation_sum_over_the_batch_maximum():
    # h: [B=1, T=3, E=2, s=2]; sums per (token, expert): [[3, 0], [1, 1], [0, 6]]; token 2 is padding
    h = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]], [[0.0, 0.0], [2.0, 4.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    target = moefication_target(h, mask)
    # the maximum over real tokens is 3 (the padding token's 6 does not count)
    torch.testing.assert_close(target[0, :2], torch.tensor([[1.0, 0.0], [1 / 3, 1 / 3]]))
    assert target.shape == (1, 3, 2)


def test_moefication_loss_is_binary_cross_entropy_on_router_logits():
    moe = two_expert_moe("moefication")
    with torch.no_grad():  # router logits: [2*x0, -x1]
        moe.router.net[0].weight.copy_(torch.eye(3, 2))
        moe.router.net[2].weight.copy_(torch.tensor([[2.0, 0, 0], [0, -1.0, 0]]))
    x = torch.tensor([[[0.5, -0.25]]])  # [B=1, T=1, d=2]
    h = moe.hidden(x)  # relu([0.5, -0.25, -0.5, 0.25]) -> expert sums [0.5, 0.25]
    loss = moefication_loss(moe, x, h, torch.ones(1, 1))
    logits = [2 * math.tanh(0.5), -math.tanh(-0.25)]
    target = [1.0, 0.5]  # sums / max
    bce = [-(t * math.log(1 / (1 + math.exp(-z))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
           for z, t in zip(logits, target)]
    torch.testing.assert_close(loss, torch.tensor([[sum(bce) / 2]]))


def test_regression_loss_is_mse_to_expert_output_norms():
    moe = two_expert_moe("regression")
    with torch.no_grad():  # router output |[x0 + x1, 0]|
        moe.router.net[0].weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
        moe.router.net[2].weight.copy_(torch.tensor([[1.0, 1.0, 0], [0, 0, 0]]))
    x = torch.tensor([[[3.0, 4.0]]])
    h = moe.hidden(x)  # expert 0 outputs (3, 4): norm 5; expert 1 outputs nothing: norm 0
    loss = regression_loss(moe, x, h)
    torch.testing.assert_close(loss, torch.tensor([[((7 - 5) ** 2 + 0) / 2]]))
