"""What a model is trained and scored on: the loss, the evaluation metric and which way is better.

Adapters name their task; training and evaluation see only this interface, so a family brings its
own task without any per-family branch elsewhere. `mask` is the real-token mask [B, T] (1 = real).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Task:
    """What every task shares: the split's metric from per-example sums (see `per_example`)."""

    metric: str
    fidelity: str  # the points key of the per-example closeness to the dense reference's outputs

    def score(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> tuple[float, float]:
        """(sum, count) whose ratio over a split is the metric."""
        sums, counts = self.per_example(logits, batch, mask)
        return float(sums.sum()), float(counts.sum())


class Classification(Task):
    """One label per sample (text or image): cross-entropy; metric accuracy (higher is better)."""

    metric = "accuracy"
    higher_is_better = True
    head_from_labels = True  # the model's head has one output per label of the data
    # the fraction of examples predicted as the dense reference predicts them: unlike accuracy, it
    # does not count a flip of a wrong prediction to another wrong one as no change
    fidelity = "agreement"

    def loss(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, batch["labels"])  # logits [B, C]

    def per_example(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor):
        """[B] correct (0 or 1) and [B] ones: each example's share of the split's accuracy."""
        return (logits.argmax(-1) == batch["labels"]).double(), torch.ones(len(logits), dtype=torch.float64)

    def fidelity_per_example(self, logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor):
        """[B] whether the prediction is the reference's, and [B] ones."""
        return (logits.argmax(-1) == reference.argmax(-1)).double(), torch.ones(len(logits), dtype=torch.float64)

    def extra(self, value: float) -> dict:
        return {}


class LanguageModeling(Task):
    """Causal LM: mean next-token cross-entropy over real target tokens; metric `loss` (lower is better).
    A position predicts the next token only when both are real, so padding never counts."""

    metric = "loss"
    higher_is_better = False
    head_from_labels = False  # the head is the vocabulary's, whatever the data
    # mean KL(dense || converted) of the next-token distributions over the targets that count
    fidelity = "kl_from_dense"

    def token_losses(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor):
        """Per-target cross-entropy [B, T-1] and the mask of targets that count [B, T-1]."""
        targets = batch["input_ids"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        return ce.view_as(targets), self.targets(mask)

    @staticmethod
    def targets(mask: torch.Tensor) -> torch.Tensor:
        """[B, T] real-token mask -> [B, T-1]: positions whose next token is real, and themselves real."""
        return (mask[:, 1:] * mask[:, :-1]).bool()

    def loss(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        ce, valid = self.token_losses(logits, batch, mask)
        return ce[valid].mean()

    def per_example(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor):
        """[B] summed loss over each sequence's targets that count, and [B] how many there are."""
        ce, valid = self.token_losses(logits, batch, mask)
        return (ce * valid).sum(-1).double(), valid.sum(-1).double()

    def fidelity_per_example(self, logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor):
        """[B] summed KL(reference || logits) over the targets that count, and [B] their number."""
        kl = kl_divergence(reference[:, :-1], logits[:, :-1])  # [B, T-1]
        valid = self.targets(mask)
        return (kl * valid).sum(-1).double(), valid.sum(-1).double()

    def extra(self, value: float) -> dict:
        return {"perplexity": float(torch.tensor(value).exp())}


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) over the last axis: [..., V] -> [...], >= 0."""
    ref, out = reference.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (ref.exp() * (ref - out)).sum(-1).clamp_min(0)  # >= 0 but for rounding


TASKS = {task.metric: task for task in (Classification(), LanguageModeling())}


def higher_is_better(metric: str) -> bool:
    """Which way a metric a points file names is better, from the task that reports it."""
    return TASKS[metric].higher_is_better


def sign(metric: str) -> float:
    """+1 when higher is better, -1 when lower is: `sign * value` always compares higher-is-better."""
    return 1.0 if higher_is_better(metric) else -1.0


def threshold(task_metric: str, dense: float, tolerance: float) -> float:
    """The worst value that keeps the dense quality (the bar): `tolerance` below dense (absolute:
    accuracy points), or `tolerance` above dense (relative: a loss)."""
    return dense - tolerance if higher_is_better(task_metric) else dense * (1 + tolerance)


def within(task_metric: str, value: float, dense: float, tolerance: float) -> bool:
    """Whether a converted point keeps the dense quality: at or past the bar (`threshold`)."""
    return sign(task_metric) * value >= sign(task_metric) * threshold(task_metric, dense, tolerance)
