"""`evaluate`: the task's metric and mean MACs per sample of one model at one expert-selection rule."""
from __future__ import annotations

from contextlib import ExitStack

import lightning as L
import torch

from ..cost import dense_macs, executed_pairs, moe_model_macs
from ..moe import moe_layers
from ..sparsity import capture_activations
from ..stats import ActivationStats, ExpertUse


class Evaluation(L.LightningModule):
    """Run with `trainer.test`; afterwards `value` (the task's metric), `macs` (mean per sample),
    `dense_macs`, `experts_per_token` (FFN MoE layers) and `attention_experts_per_token` (the
    projections' MoE layers, when converted). Given `expert_use` (FFN layers) or `activations` (each
    for the layers of its kind), also fills them."""

    def __init__(self, model: torch.nn.Module, adapter, dims, expert_use: ExpertUse | None = None,
                 activations: list[ActivationStats] = ()):
        super().__init__()
        self.model, self.adapter, self.dims = model, adapter, dims
        self.expert_use, self.activations = expert_use, list(activations)

    def on_test_epoch_start(self) -> None:
        self.samples = 0
        self.metric_sum = self.metric_count = 0.0
        self.macs_sum = self.dense_macs_sum = 0.0
        self.pairs = {"ffn": 0.0, "attention": 0.0}  # executed pairs per layer, summed over batches
        self.tokens = 0.0

    def test_step(self, batch: dict, batch_idx: int) -> None:
        mask = self.adapter.token_mask(batch)
        with ExitStack() as stack:
            captured = [stack.enter_context(capture_activations(self.model, a.kind)) for a in self.activations]
            logits = self.adapter.forward(self.model, batch)
        for stats, acts in zip(self.activations, captured):
            stats.update(acts, mask)
        total, count = self.adapter.task.score(logits, batch, mask)
        self.metric_sum, self.metric_count = self.metric_sum + total, self.metric_count + count
        tokens = mask.sum(-1)
        self.samples += len(mask)
        self.dense_macs_sum += float(dense_macs(self.adapter, tokens, self.dims).sum())
        moes = moe_layers(self.model)  # one walk over the modules per batch
        if moes:
            self.macs_sum += float(moe_model_macs(self.adapter, self.model, mask, self.dims).sum())
            for kind in self.pairs:
                if of_kind := [m for m in moes if m.kind == kind]:
                    self.pairs[kind] += sum(float(executed_pairs(m, mask).sum()) for m in of_kind) / len(of_kind)
            self.tokens += float(tokens.sum())
            if self.expert_use is not None:
                masks = [m.last_mask for m in moes if m.kind == "ffn"]
                self.expert_use.update(masks, mask, batch.get("pixel_values"))
        else:
            self.macs_sum += float(dense_macs(self.adapter, tokens, self.dims).sum())

    @property
    def value(self) -> float:
        """The metric over the split: accuracy over samples, or loss over target tokens."""
        return self.metric_sum / self.metric_count

    @property
    def macs(self) -> float:
        return self.macs_sum / self.samples

    @property
    def dense_macs(self) -> float:
        """Mean MACs of the dense model on the same samples: the denominator of rel_cost."""
        return self.dense_macs_sum / self.samples

    @property
    def rel_cost(self) -> float:
        """macs / dense_macs: the cost relative to the dense model on the same samples."""
        return self.macs / self.dense_macs

    @property
    def experts_per_token(self) -> float | None:
        """Mean over FFN MoE layers and real tokens of the experts executed."""
        return self.pairs["ffn"] / self.tokens if self.tokens else None

    @property
    def attention_experts_per_token(self) -> float | None:
        """The same over the attention projections' MoE layers; None when there are none."""
        return self.pairs["attention"] / self.tokens if self.tokens and moe_layers(self.model, "attention") else None
