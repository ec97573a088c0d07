"""Router losses on hand-computed examples: D2DMoE's regression and MoEfication's BCE."""
import math

import torch
from torch import nn

from d2dmoe.moe import FFN, MoE, Router, moe_layers
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


class Batches(torch.utils.data.Dataset):
    """Fixed tiny-BERT batches (the data a router phase would see), one per item."""

    def __init__(self, n: int = 4):
        from tests.test_attention import batch_for

        self.batches = [batch_for("bert", lengths=(9, 5 + i)) for i in range(n)]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def tiny_converted_bert(bias: float):
    """A tiny BERT (dropout on) cut into experts, every bias of its FFNs set far from zero."""
    from d2dmoe.phases.split import split_model
    from tests.test_attention import build, tiny

    adapter = tiny("bert")
    adapter.config_overrides.update(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    model = adapter.install_ffns(build("bert", adapter), nn.ReLU())
    split_model(adapter, model, num_experts=4, router_hidden=8, n_init=1)
    with torch.no_grad():
        for moe in moe_layers(model):
            moe.b1.fill_(bias)
            moe.b2.fill_(3 * bias)
    return adapter, model


def test_router_training_keeps_the_base_frozen_and_in_eval_mode():
    """At every step no module of the base is in train mode (its dropout would move the targets), and
    afterwards every base weight is what it was; only the routers changed."""
    import lightning as L

    from d2dmoe.phases.routers import RouterTraining

    adapter, model = tiny_converted_bert(bias=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = RouterTraining(model.train(), adapter, lr=1e-2)  # handed over in train mode, as a phase may
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([n for n, m in pl_module.model.named_modules() if m.training])

    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    trainer = L.Trainer(max_epochs=2, callbacks=[Watch()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert len(seen) == 8 and all(not training for training in seen), seen[:1]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".router." in k for k in changed), sorted(changed)[:5]


def test_the_regression_target_is_each_experts_output_norm_without_the_bias():
    """Against a direct computation, expert by expert, on a model whose b1 and b2 are far from zero:
    ||W2_e relu(W1_e x + b1_e)||, the output bias b2 left out (it is added once, outside the experts)."""
    from d2dmoe.phases.routers import RouterTraining, capture_moe_io
    from tests.test_attention import batch_for

    adapter, model = tiny_converted_bert(bias=2.0)
    batch = batch_for("bert")
    module = RouterTraining(model, adapter)
    with capture_moe_io(model) as captured, torch.no_grad():
        adapter.forward(model, batch)
    mask = adapter.token_mask(batch).bool()
    losses = []
    for moe, x, _ in captured:
        direct = torch.stack([(torch.relu(x @ moe.w1[e].T + moe.b1[e]) @ moe.w2[e].T).norm(dim=-1)
                              for e in range(moe.num_experts)], -1)  # [B, T, E]
        per_token = (moe.router(x) - direct).pow(2).mean(-1)
        losses.append(per_token[mask].mean())
    with torch.no_grad():
        torch.testing.assert_close(module.router_loss(batch), torch.stack(losses).mean())
    assert all(moe.b2.abs().min() > 1 for moe in moe_layers(model))  # the bias would have shifted every norm
