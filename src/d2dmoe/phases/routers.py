"""`routers`: train one router per MoE layer, base frozen. D2DMoE's regression router learns each
expert's output norm (MSE); MoEfication's routers (both kinds) learn each expert's share of the
activations (BCE)."""
from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F

from ..moe import AllExperts, MoE, moe_layers, set_gate
from ..sharded import shard
from ..sparsity import masked_token_mean
from .guard import check_finite


@contextmanager
def capture_moe_io(model: torch.nn.Module):
    """Yields a list that fills, on each forward, with (moe, x [B, T, d], h [B, T, E, s]) for every
    MoE layer: its input and every expert's activations (run with every expert active)."""
    store: list = []
    handles = []
    for m in moe_layers(model):
        handles.append(m.register_forward_pre_hook(lambda mod, args: store.append([mod, args[0]])))
        handles.append(m.tap.register_forward_hook(lambda mod, args, out: store[-1].append(out)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def regression_loss(moe: MoE, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per token [B, T]: MSE over experts between the router and the expert output norms
    ||W2_e act(W1_e x + b1_e)||_2, which come from the activations the forward already computed."""
    return (moe.router(x) - moe.hidden_norms(h)).pow(2).mean(-1)


def moefication_target(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each expert's summed activation magnitude (for ReLU: its summed activations), divided by the
    largest such sum over the batch's real tokens and experts: [B, T, E, s] -> [B, T, E] in [0, 1]."""
    sums = h.abs().sum(-1)  # [B, T, E]
    return sums / sums[mask.bool()].max().clamp_min(1e-12)


def moefication_loss(moe: MoE, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per token [B, T]: binary cross-entropy over experts between sigmoid(router logits) and the target."""
    target = moefication_target(h, mask)
    return F.binary_cross_entropy_with_logits(moe.router.logits(x), target, reduction="none").mean(-1)


class RouterTraining(L.LightningModule):
    phase = "routers"

    def __init__(self, model: torch.nn.Module, adapter, *, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.model = model.eval()  # the base stays in eval mode (no dropout) while routers train
        self.adapter = adapter
        self.lr, self.weight_decay = lr, weight_decay
        model.requires_grad_(False)
        for moe in moe_layers(model):
            moe.router.requires_grad_(True)
            if moe.router.kind == "moefication_original":  # MoEfication's own start: its similarity selection
                moe.router.start_at_centroids(moe.w1)
        set_gate(model, AllExperts())  # targets are computed with every expert run (one masked matmul)

    def configure_model(self) -> None:
        # trainer=fsdp: only the routers train and get sharded; the frozen base stays whole on each
        # rank, since the router targets read expert weights outside the forward, where FSDP keeps
        # parameters sharded
        shard(self, [moe.router for moe in moe_layers(self.model)])

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # also when Lightning switches back from validation to training
        return self

    def router_loss(self, batch: dict) -> torch.Tensor:
        """Each router's loss, mean over real tokens and experts, then over layers."""
        with capture_moe_io(self.model) as captured, torch.no_grad():
            self.adapter.forward(self.model, batch)
        mask = self.adapter.token_mask(batch)
        losses = []
        for moe, x, h in captured:  # the forward already computed every expert's activations h
            if moe.router.kind == "regression":
                per_token = regression_loss(moe, x, h)
            else:
                per_token = moefication_loss(moe, x, h, mask)
            losses.append(masked_token_mean(per_token, mask))
        return torch.stack(losses).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.router_loss(batch)
        check_finite(self.phase, self.global_step, loss)
        self.log("router/train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch_size = len(self.adapter.token_mask(batch))
        self.log("router/val_loss", self.router_loss(batch), prog_bar=True, batch_size=batch_size)

    def configure_optimizers(self):
        params = [p for m in moe_layers(self.model) for p in m.router.parameters()]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
