"""Training-free activation sparsity, the baselines D2DMoE is drawn beside (`method=cats`, `method=teal`).

Both keep the model's own FFNs and activation and zero activations of small magnitude, with
thresholds calibrated on training tokens to a target sparsity (the fraction of entries zeroed):

- CATS (Lee et al., 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large Language
  Models"): in w2(act(w1 x) [* up(x)]), the activations a = act(w1 x) with |a| <= t are set to 0,
  t per layer the target quantile of |a|. w1 runs whole (its output decides); a zero neuron's row
  of `up` and column of w2 are not read: d F + (M - 1) d n MACs per token, n the neurons kept and
  M the FFN's weight matrices (2, or 3 when gated).
- TEAL (Liu et al., 2024, "Training-Free Activation Sparsity in Large Language Models"): the input
  of each projection has its entries with |x_i| <= t set to 0, t per projection the target quantile
  of |x_i|; a zero entry's column of the weight is not read. On the FFN: x into w1 (and up), h into
  w2: (M - 1) F m + d n MACs per token, m the input entries kept, n the hidden entries kept.

Shapes: B batch, T tokens, d width, F FFN width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .moe import FFN

RULES = ("cats", "teal")
SAMPLE = 1 << 20  # values per threshold kept for the quantile (a uniform sample beyond that)


class Thresholded(nn.Module):
    """An FFN run with CATS or TEAL thresholds at one target sparsity at a time (`target`: a key of
    `thresholds`, or None: the dense FFN). `last_macs` [B, T]: each token's FFN MACs in the last
    forward, counting only the weights read."""

    def __init__(self, ffn: FFN, rule: str):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown training-free rule {rule!r}; allowed: {RULES}")
        self.ffn, self.rule = ffn, rule
        self.matrices = 2 if ffn.up is None else 3
        self.d, self.d_ff = ffn.w1.in_features, ffn.w1.out_features
        self.thresholds: dict[float, dict[str, float]] = {}  # target -> {"a"} (CATS) or {"x", "h"} (TEAL)
        self.target: float | None = None
        self.last_macs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, d]
        f, t = self.ffn, self.thresholds.get(self.target)
        if t is None:
            self.last_macs = x.new_full(x.shape[:-1], float(self.matrices * self.d * self.d_ff))
            return f(x)
        if self.rule == "cats":
            a = f.act(f.w1(x))
            kept = a.abs() > t["a"]
            a = a * kept
            h = a if f.up is None else a * f.up(x)
            self.last_macs = self.d * self.d_ff + (self.matrices - 1) * self.d * kept.sum(-1).double()
            return f.w2(h)
        kept_x = x.abs() > t["x"]
        x = x * kept_x
        h = f.act(f.w1(x))
        if f.up is not None:
            h = h * f.up(x)
        kept_h = h.abs() > t["h"]
        self.last_macs = ((self.matrices - 1) * self.d_ff * kept_x.sum(-1).double()
                          + self.d * kept_h.sum(-1).double())
        return f.w2(h * kept_h)

    def magnitudes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the thresholds are quantiles of, for a batch of real tokens x [N, d]: |a| [N, F]
        (CATS); |x| [N, d] and |h| [N, F] (TEAL, h from the unthresholded input)."""
        f = self.ffn
        a = f.act(f.w1(x))
        if self.rule == "cats":
            return {"a": a.abs()}
        h = a if f.up is None else a * f.up(x)
        return {"x": x.abs(), "h": h.abs()}


@dataclass(frozen=True)
class Target:
    """An evaluation point of a baseline: the calibrated target sparsity its thresholds run at."""
    sparsity: float


def thresholded_layers(model: nn.Module) -> list[Thresholded]:
    return [m for m in model.modules() if isinstance(m, Thresholded)]


def install(adapter, model: nn.Module, rule: str) -> nn.Module:
    """Every block's FFN (placed by the adapter, the model's own activation) run as Thresholded."""
    model = adapter.install_ffns(model)
    for parent, name in adapter.ffn_slots(model):
        setattr(parent, name, Thresholded(getattr(parent, name), rule))
    return model


def set_target(model: nn.Module, target: float | None) -> None:
    """The calibrated sparsity every thresholded FFN runs at; None runs them dense."""
    for layer in thresholded_layers(model):
        if target is not None and target not in layer.thresholds:
            raise KeyError(f"sparsity {target} was not calibrated (calibrated: {sorted(layer.thresholds)})")
        layer.target = target


@torch.no_grad()
def calibrate(model: nn.Module, adapter, batches, targets: list[float], seed: int = 0) -> None:
    """Each thresholded FFN's thresholds at each target sparsity: the target quantile of the
    magnitudes (Thresholded.magnitudes) over the real tokens of `batches`, run through the dense
    model (every threshold from the model's own activations, none from another's output); at most
    SAMPLE values per threshold, drawn uniformly with a fixed seed."""
    layers = thresholded_layers(model)
    seen: list[dict[str, list[torch.Tensor]]] = [{} for _ in layers]
    real: list[torch.Tensor] = []
    generator = torch.Generator().manual_seed(seed)

    def record(i):
        def hook(module, args):
            x = args[0][real[-1]]  # [N, d]: the batch's real tokens
            for key, values in module.magnitudes(x).items():
                seen[i].setdefault(key, []).append(values.flatten().float().cpu())
        return hook

    set_target(model, None)
    hooks = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            real.append(adapter.token_mask(batch).bool())
            adapter.forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    q = torch.tensor([float(t) for t in targets])
    for layer, values in zip(layers, seen):
        quantiles = {}
        for key, parts in values.items():
            flat = torch.cat(parts)
            if flat.numel() > SAMPLE:
                flat = flat[torch.randperm(flat.numel(), generator=generator)[:SAMPLE]]
            quantiles[key] = torch.quantile(flat, q).tolist()
        layer.thresholds = {float(t): {key: v[j] for key, v in quantiles.items()} for j, t in enumerate(targets)}
