"""`dense` and `sparsify`: fine-tune the classifier on the task loss, plus alpha_t times a sparsity
penalty on the FFN activations when one is given (sparsify)."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from ..sparsity import alpha_at, capture_activations, penalty


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


class ClassifierTraining(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.01,
                 warmup_fraction: float = 0.1, penalty: str | None = None, alpha: float = 0.0,
                 schedule: str = "linear_warmup"):
        super().__init__()
        self.model = model.train()  # Lightning keeps the modes it is given: dropout on while fine-tuning
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.penalty_kind, self.alpha, self.schedule = penalty, alpha, schedule

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(**model_inputs(batch)).logits  # [B, C]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.penalty_kind is None:
            loss = F.cross_entropy(self(batch), batch["labels"])
            self.log("train/loss", loss, prog_bar=True)
            return loss
        with capture_activations(self.model) as acts:
            task = F.cross_entropy(self(batch), batch["labels"])
        pen = penalty(acts, batch["attention_mask"], self.penalty_kind)
        alpha_t = alpha_at(self.alpha, self.schedule, self.global_step, self.trainer.estimated_stepping_batches)
        loss = task + alpha_t * pen
        self.log_dict({"train/loss": loss, "train/task_loss": task, "train/penalty": pen,
                       "train/alpha": alpha_t}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with capture_activations(self.model) as acts:
            logits = self(batch)
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val/accuracy", accuracy, prog_bar=True, batch_size=len(logits))
        if acts:  # fraction of exactly-zero FFN activations on real tokens
            mask = batch["attention_mask"].bool()
            zeros = torch.stack([(a[mask] == 0).float().mean() for a in acts]).mean()
            self.log("val/zero_fraction", zeros, batch_size=len(logits))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = max(int(self.warmup_fraction * total), 1)

        def factor(step: int) -> float:  # linear warm-up, then linear decay to 0
            return min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
