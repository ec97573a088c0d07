"""`routers`: train one router per MoE layer to regress each expert's output norm; base frozen."""
from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch

from ..moe import AllExperts, moe_layers, set_gate
from ..sparsity import masked_token_mean


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


class RouterTraining(L.LightningModule):
    def __init__(self, model: torch.nn.Module, adapter, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.model = model.eval()  # the base stays in eval mode (no dropout) while routers train
        self.adapter = adapter
        self.lr, self.weight_decay = lr, weight_decay
        model.requires_grad_(False)
        for moe in moe_layers(model):
            moe.router.requires_grad_(True)
        set_gate(model, AllExperts())  # targets are computed with every expert run (one masked matmul)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # also when Lightning switches back from validation to training
        return self

    def router_loss(self, batch: dict) -> torch.Tensor:
        """MSE between router outputs and expert norms, mean over real tokens and experts, then layers."""
        with capture_moe_io(self.model) as captured, torch.no_grad():
            self.adapter.forward(self.model, batch)
        mask = self.adapter.token_mask(batch)
        losses = []
        for moe, x, h in captured:
            # the forward already computed every expert's activations: reuse them for the targets
            target = moe.hidden_norms(h)  # [B, T, E]
            err = (moe.router(x) - target).pow(2).mean(-1)  # [B, T]
            losses.append(masked_token_mean(err, mask))
        return torch.stack(losses).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.router_loss(batch)
        self.log("router/train_mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        batch_size = len(self.adapter.token_mask(batch))
        self.log("router/val_mse", self.router_loss(batch), prog_bar=True, batch_size=batch_size)

    def configure_optimizers(self):
        params = [p for m in moe_layers(self.model) for p in m.router.parameters()]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
