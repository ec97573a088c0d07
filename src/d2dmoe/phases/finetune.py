"""`dense` and `sparsify`: train the model on its task's loss, plus alpha_t times a sparsity penalty
on the FFN activations when one is given (sparsify). The task (classification, language modelling)
and how to run the model come from the adapter."""
from __future__ import annotations

import lightning as L
import torch

from ..moe import ffn_layers
from ..sharded import shard_blocks
from ..sparsity import alpha_at, capture_activations, grouped_penalty
from .guard import check_finite


class TaskTraining(L.LightningModule):
    phase = "dense"  # the name errors and logs use; the pipeline sets it to the phase it runs

    def __init__(self, model: torch.nn.Module, adapter, *, lr: float, weight_decay: float = 0.01,
                 warmup_fraction: float = 0.1, penalty: str | None = None, alpha: float = 0.0,
                 schedule: str = "linear_warmup", attention_scale: float = 1.0,
                 attention_lr: float | None = None):
        super().__init__()
        self.model = model.train()  # Lightning keeps the modes it is given: dropout on while fine-tuning
        self.adapter, self.task = adapter, adapter.task
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.penalty_kind, self.alpha, self.schedule = penalty, alpha, schedule
        self.attention_scale = attention_scale  # the projection MLPs' penalty weight, relative to the FFNs'
        self.attention_lr = attention_lr  # the projection MLPs' learning rate; None: lr, like every weight

    def configure_model(self) -> None:
        shard_blocks(self)  # trainer=fsdp only

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mask = self.adapter.token_mask(batch)
        if self.penalty_kind is None:
            loss = self.task.loss(self.adapter.forward(self.model, batch), batch, mask)
            check_finite(self.phase, self.global_step, loss)
            self.log("train/loss", loss, prog_bar=True)
            return loss
        with capture_activations(self.model, "ffn") as ffn, capture_activations(self.model, "attention") as attention:
            task = self.task.loss(self.adapter.forward(self.model, batch), batch, mask)
        pen = grouped_penalty([ffn, attention], mask, self.penalty_kind, [1.0, self.attention_scale])
        alpha_t = alpha_at(self.alpha, self.schedule, self.global_step, self.trainer.estimated_stepping_batches)
        loss = task + alpha_t * pen
        check_finite(self.phase, self.global_step, loss, task=task, penalty=pen, alpha=alpha_t)
        self.log_dict({"train/loss": loss, "train/task_loss": task, "train/penalty": pen,
                       "train/alpha": alpha_t}, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sum = self.val_count = self.val_loss_sum = 0.0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        mask = self.adapter.token_mask(batch)
        with capture_activations(self.model) as acts:
            logits = self.adapter.forward(self.model, batch)
        total, count = self.task.score(logits, batch, mask)
        self.val_sum, self.val_count = self.val_sum + total, self.val_count + count
        if self.task.metric != "loss":  # the loss too: it breaks ties of the metric (early_stopping)
            self.val_loss_sum += float(self.task.loss(logits, batch, mask)) * count
        if acts:  # fraction of exactly-zero FFN activations on real tokens
            zeros = torch.stack([(a[mask.bool()] == 0).float().mean() for a in acts]).mean()
            self.log("val/zero_fraction", zeros, batch_size=len(mask))

    def on_validation_epoch_end(self) -> None:
        # the metric over the whole split (token-weighted for language models), not a mean of batches;
        # data-parallel, each process saw its share of the batches: their sums are added first, so every
        # process logs (and early stopping reads) what one process would on the whole split
        sums = torch.tensor([self.val_sum, self.val_count, self.val_loss_sum], dtype=torch.float64, device=self.device)
        total, count, loss = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        self.log(f"val/{self.task.metric}", total / max(count, 1), prog_bar=True)
        if self.task.metric != "loss":
            self.log("val/loss", loss / max(count, 1))

    def configure_optimizers(self):
        params = self.model.parameters()
        mlps = {id(p) for m in ffn_layers(self.model, "attention") for p in m.parameters()}
        # freshly distilled projection MLPs need more than a fine-tuning lr to sparsify
        if self.attention_lr is not None and mlps:
            params = [{"params": [p for p in self.model.parameters() if id(p) not in mlps]},
                      {"params": [p for p in self.model.parameters() if id(p) in mlps], "lr": self.attention_lr}]
        return adamw_warmup_decay(params, self.trainer, self.lr, self.weight_decay, self.warmup_fraction)


def adamw_warmup_decay(params, trainer: L.Trainer, lr: float, weight_decay: float, warmup_fraction: float) -> dict:
    """AdamW with a linear warm-up over `warmup_fraction` of the steps, then linear decay to 0."""
    # fused: one kernel for every parameter (5x faster steps than the per-tensor loop on the CPU)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    total = max(int(trainer.estimated_stepping_batches), 1)
    warmup = max(int(warmup_fraction * total), 1)

    def factor(step: int) -> float:
        return min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
