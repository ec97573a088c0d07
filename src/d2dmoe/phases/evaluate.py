"""`evaluate`: the task's metric and mean MACs per sample of one model at one expert-selection rule,
on one split, with every example's share of them kept (`examples`), so that figures can resample
examples for confidence intervals and pair two models on the same examples."""
from __future__ import annotations

from contextlib import ExitStack

import lightning as L
import numpy as np
import torch
from torch import nn

from ..cost import dense_macs, executed_pairs, moe_model_macs, thresholded_model_macs
from ..moe import moe_layers
from ..sparsity import capture_activations
from ..stats import ActivationStats, ExpertUse
from ..thresholds import thresholded_layers

# examples.npz's arrays per split (results.py): the metric's sum and count, MACs, the dense model's
# MACs, and the fidelity's sum and count
EXAMPLE_KEYS = ("sum", "count", "macs", "dense_macs", "fidelity_sum", "fidelity_count")


class Reference(nn.Module):
    """The dense reference's outputs, batch by batch of a split, to compare a converted model's with
    (the task's `fidelity`). A classifier's logits are kept after the first pass ([B, C]: small); a
    language model's ([B, T, V]) are computed again each time."""

    def __init__(self, model: nn.Module, adapter):
        super().__init__()
        self.model, self.adapter = model, adapter  # a submodule: Lightning moves it with the evaluated model
        self.kept: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def logits(self, split: str, batch_idx: int, batch: dict, own: torch.Tensor | None = None) -> torch.Tensor:
        """The reference's logits for a batch; `own`: those the reference model itself just gave for it
        (when the reference is the model evaluated), taken instead of a second forward."""
        if (split, batch_idx) in self.kept:
            return self.kept[split, batch_idx]
        out = own.detach() if own is not None else self.adapter.forward(self.model.eval(), batch)
        if out.dim() == 2:
            self.kept[split, batch_idx] = out
        return out


class Evaluation(L.LightningModule):
    """Run with `trainer.test` (on the test split, or on validation with `split="validation"`);
    afterwards `value` (the task's metric), `macs` (mean per sample), `dense_macs`, `fidelity` (given a
    `reference`: agreement with the dense model, or KL from it), `experts_per_token` (FFN MoE layers),
    `attention_experts_per_token` (the projections' MoE layers, when converted) and `examples` (the
    same sums per example). Given `expert_use` (FFN layers) or `activations` (each for the layers of
    its kind), also fills them."""

    def __init__(self, model: torch.nn.Module, adapter, dims, expert_use: ExpertUse | None = None,
                 activations: list[ActivationStats] = (), reference: Reference | None = None,
                 split: str = "test"):
        super().__init__()
        self.model, self.adapter, self.dims = model, adapter, dims
        self.expert_use, self.activations = expert_use, list(activations)
        self.reference, self.split = reference, split

    def on_test_epoch_start(self) -> None:
        # per batch, per example [B]: the metric's sum and count, MACs, the dense model's MACs, and
        # the fidelity's sum and count; concatenated in `examples`
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in EXAMPLE_KEYS}
        self.pairs = {"ffn": 0.0, "attention": 0.0}  # executed pairs per layer, summed over batches
        self.tokens = 0.0

    def keep(self, **per_example: torch.Tensor) -> None:
        for key, values in per_example.items():
            self.parts[key].append(values.detach().double().cpu())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        mask = self.adapter.token_mask(batch)
        with ExitStack() as stack:
            captured = [stack.enter_context(capture_activations(self.model, a.kind)) for a in self.activations]
            logits = self.adapter.forward(self.model, batch)
        for stats, acts in zip(self.activations, captured):
            stats.update(acts, mask)
        task = self.adapter.task
        tokens = mask.sum(-1)
        sums, counts = task.per_example(logits, batch, mask)
        dense = dense_macs(self.adapter, tokens, self.dims)
        moes = moe_layers(self.model)  # one walk over the modules per batch
        if moes:
            macs = moe_model_macs(self.adapter, self.model, mask, self.dims)
        elif thresholded_layers(self.model):
            macs = thresholded_model_macs(self.adapter, self.model, mask, self.dims)
        else:
            macs = dense
        self.keep(sum=sums, count=counts, dense_macs=dense, macs=macs)
        if self.reference is not None:
            own = logits if self.reference.model is self.model else None  # the dense point: no second forward
            reference = self.reference.logits(self.split, batch_idx, batch, own)
            agree, over = task.fidelity_per_example(logits, reference, mask)
            self.keep(fidelity_sum=agree, fidelity_count=over)
        if moes:
            for kind in self.pairs:
                if of_kind := [m for m in moes if m.kind == kind]:
                    self.pairs[kind] += sum(float(executed_pairs(m, mask).sum()) for m in of_kind) / len(of_kind)
            self.tokens += float(tokens.sum())
            if self.expert_use is not None:
                masks = [m.last_mask for m in moes if m.kind == "ffn"]
                self.expert_use.update(masks, mask, batch.get("pixel_values"))

    @property
    def examples(self) -> dict[str, np.ndarray]:
        """Per example, in the split's evaluation order (EXAMPLE_KEYS; the fidelity's only with a
        reference): float64 [N] each."""
        return {k: torch.cat(v).numpy() for k, v in self.parts.items() if v}

    def total(self, key: str) -> float:
        return float(sum(float(v.sum()) for v in self.parts[key]))

    @property
    def value(self) -> float:
        """The metric over the split: accuracy over samples, or loss over target tokens."""
        return self.total("sum") / self.total("count")

    @property
    def samples(self) -> int:
        return sum(len(v) for v in self.parts["count"])

    @property
    def macs(self) -> float:
        return self.total("macs") / self.samples

    @property
    def dense_macs(self) -> float:
        """Mean MACs of the dense model on the same samples: the denominator of rel_cost."""
        return self.total("dense_macs") / self.samples

    @property
    def fidelity(self) -> float | None:
        """Agreement with the dense reference (classification) or mean KL from it (language models)."""
        return self.total("fidelity_sum") / self.total("fidelity_count") if self.parts["fidelity_count"] else None

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
