"""`routers`: train one router per MoE layer to regress each expert's output norm; base frozen."""
from __future__ import annotations

from contextlib import contextmanager

import lightning as L
import torch

from ..moe import AllExperts, moe_layers, set_gate
from ..sparsity import masked_token_mean
from .finetune import model_inputs


@contextmanager
def capture_moe_inputs(model: torch.nn.Module):
    """Yields a list that fills with (moe, x [B, T, d]) for every MoE layer on each forward."""
    store: list = []
    handles = [m.register_forward_pre_hook(lambda mod, args: store.append((mod, args[0])))
               for m in moe_layers(model)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class RouterTraining(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.model = model.eval()  # the base stays in eval mode (no dropout) while routers train
        self.lr, self.weight_decay = lr, weight_decay
        model.requires_grad_(False)
        for moe in moe_layers(model):
            moe.router.requires_grad_(True)
        set_gate(model, AllExperts())  # targets are computed with every expert run

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # also when Lightning switches back from validation to training
        return self

    def router_loss(self, batch: dict) -> torch.Tensor:
        """MSE between router outputs and expert norms, mean over real tokens and experts, then layers."""
        with capture_moe_inputs(self.model) as inputs, torch.no_grad():
            self.model(**model_inputs(batch))
        mask = batch["attention_mask"]
        losses = []
        for moe, x in inputs:
            target = moe.expert_norms(x.flatten(0, 1)).unflatten(0, x.shape[:2])  # [B, T, E]
            err = (moe.router(x) - target).pow(2).mean(-1)  # [B, T]
            losses.append(masked_token_mean(err, mask))
        return torch.stack(losses).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.router_loss(batch)
        self.log("router/train_mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("router/val_mse", self.router_loss(batch), prog_bar=True, batch_size=len(batch["labels"]))

    def configure_optimizers(self):
        params = [p for m in moe_layers(self.model) for p in m.router.parameters()]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
