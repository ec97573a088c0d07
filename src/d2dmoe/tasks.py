"""What a model is trained and scored on: the loss, the evaluation metric and which way is better.

Adapters name their task; training and evaluation see only this interface, so a family brings its
own task without any per-family branch elsewhere. `mask` is the real-token mask [B, T] (1 = real).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Classification:
    """One label per sample (text or image): cross-entropy; metric accuracy (higher is better)."""

    metric = "accuracy"
    higher_is_better = True
    head_from_labels = True  # the model's head has one output per label of the data

    def loss(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])  # logits [B, C]

    def score(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> tuple[float, float]:
        """(sum, count) whose ratio over a split is the metric: correct predictions, samples."""
        return float((logits.argmax(-1) == batch["labels"]).sum()), float(len(logits))

    def extra(self, value: float) -> dict:
        return {}


class LanguageModeling:
    """Causal LM: mean next-token cross-entropy over real target tokens; metric `loss` (lower is better).
    A position predicts the next token only when both are real, so padding never counts."""

    metric = "loss"
    higher_is_better = False
    head_from_labels = False  # the head is the vocabulary's, whatever the data

    def token_losses(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor):
        """Per-target cross-entropy [B, T-1] and the mask of targets that count [B, T-1]."""
        targets = batch["input_ids"][:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        return ce.view_as(targets), valid

    def loss(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        ce, valid = self.token_losses(logits, batch, mask)
        return ce[valid].mean()

    def score(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> tuple[float, float]:
        ce, valid = self.token_losses(logits, batch, mask)
        return float(ce[valid].sum()), float(valid.sum())

    def extra(self, value: float) -> dict:
        return {"perplexity": float(torch.tensor(value).exp())}


TASKS = {task.metric: task for task in (Classification(), LanguageModeling())}


def higher_is_better(metric: str) -> bool:
    """Which way a metric a points file names is better, from the task that reports it."""
    return TASKS[metric].higher_is_better


def sign(metric: str) -> float:
    """+1 when higher is better, -1 when lower is: `sign * value` always compares higher-is-better."""
    return 1.0 if higher_is_better(metric) else -1.0


def within(task_metric: str, value: float, dense: float, tolerance: float) -> bool:
    """Whether a converted point keeps the dense quality: at most `tolerance` below dense (absolute:
    accuracy points), or at most `tolerance` above dense (relative: a loss)."""
    if higher_is_better(task_metric):
        return value >= dense - tolerance
    return value <= dense * (1 + tolerance)
