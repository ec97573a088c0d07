"""`attention` (optional, before `sparsify`): distil each attention projection into the MLP that
replaces it (attention.py). The original model is frozen and runs unchanged, so every MLP sees the
input its projection sees in the original model; the loss is each MLP's mean squared error to its
projection's output, averaged over real tokens, then over projections."""
from __future__ import annotations

import lightning as L
import torch

from ..attention import distill_modules
from ..sharded import shard_blocks
from ..sparsity import masked_token_mean
from .finetune import adamw_warmup_decay
from .guard import check_finite


class AttentionDistillation(L.LightningModule):
    phase = "attention"

    def __init__(self, model: torch.nn.Module, adapter, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_fraction: float = 0.05):
        """model: the dense model with a `Distill` in place of each projection."""
        super().__init__()
        self.model, self.adapter = model.eval(), adapter  # eval: the original runs without dropout
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.distills = distill_modules(model)
        if not self.distills:
            raise ValueError("no attention projection is being distilled (install_projection_mlps(distill=True))")
        model.requires_grad_(False)
        for m in self.distills:
            m.mlp.requires_grad_(True)

    def configure_model(self) -> None:
        shard_blocks(self)  # trainer=fsdp only

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # also when Lightning switches back from validation to training
        return self

    def losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean squared error, relative error), each per projection over real tokens, then the mean
        over projections. The relative error divides by the mean square of the projection's output."""
        self.adapter.forward(self.model, batch)
        mask = self.adapter.token_mask(batch)
        mse = torch.stack([masked_token_mean(m.error, mask) for m in self.distills])  # [P]
        power = torch.stack([masked_token_mean(m.power, mask) for m in self.distills])  # [P]
        for m in self.distills:
            m.error = m.power = None  # the loss holds what backward needs; the modules keep no graph
        return mse.mean(), (mse.detach() / power.clamp_min(1e-12)).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, relative = self.losses(batch)
        check_finite(self.phase, self.global_step, loss)
        self.log_dict({"attention/train_mse": loss, "attention/train_relative_error": relative}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, relative = self.losses(batch)
        self.log_dict({"attention/val_mse": loss, "attention/val_relative_error": relative}, prog_bar=True,
                      batch_size=len(self.adapter.token_mask(batch)))

    def configure_optimizers(self):
        params = [p for m in self.distills for p in m.mlp.parameters()]
        return adamw_warmup_decay(params, self.trainer, self.lr, self.weight_decay, self.warmup_fraction)
