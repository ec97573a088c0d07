"""Statistics the figures need, accumulated over the test split during `evaluate`.

- `ActivationStats`: per FFN layer (or per MLP that replaced an attention projection), the fraction
  of zero activations per real token (mean, spread across tokens, histogram): how sparse the
  converted model is, independent of any gate.
- `ExpertUse`: per MoE layer, how many experts each real token executed (histogram over 0..E), and
  for models with a patch grid (ViT) the executed experts per patch, averaged over layers, as a mean
  map over every test image and as maps of the first `keep` images (kept with their pixels).
"""
from __future__ import annotations

import torch

NONZERO_BINS = 50  # histogram bins of the per-token fraction of non-zero activations, over [0, 1]


class ActivationStats:
    def __init__(self, kind: str = "ffn"):
        self.kind = kind  # which layers: "ffn", or "attention" (the projections' MLPs)
        self.layers: list[dict] = []

    def update(self, activations: list[torch.Tensor], mask: torch.Tensor) -> None:
        """activations: L x [B, T, F]; mask [B, T] (1 = real token)."""
        real = mask.bool()
        if not self.layers:
            self.layers = [{"sum": 0.0, "sum_sq": 0.0, "tokens": 0, "hist": torch.zeros(NONZERO_BINS)}
                           for _ in activations]
        for acc, a in zip(self.layers, activations):
            zero = (a == 0).float().mean(-1)[real]  # [N] fraction of zeros per real token
            acc["sum"] += float(zero.sum())
            acc["sum_sq"] += float(zero.pow(2).sum())
            acc["tokens"] += zero.numel()
            acc["hist"] += torch.histc(1 - zero, bins=NONZERO_BINS, min=0.0, max=1.0)

    def result(self) -> list[dict]:
        out = []
        for layer, acc in enumerate(self.layers):
            n = max(acc["tokens"], 1)
            mean = acc["sum"] / n
            std = max(acc["sum_sq"] / n - mean**2, 0.0) ** 0.5
            out.append({"layer": layer, "zero_fraction": mean, "zero_fraction_std": std,
                        "nonzero_fraction_hist": [int(c) for c in acc["hist"].tolist()]})
        return out


class ExpertUse:
    def __init__(self, patch_grid: tuple[int, int, int] | None = None, keep: int = 8):
        """patch_grid: (prefix tokens, grid height, grid width) for ViTs, else None."""
        self.patch_grid, self.keep = patch_grid, keep
        self.hists: list[torch.Tensor] = []  # per layer [E + 1]
        self.patch_sum: torch.Tensor | None = None  # [gh, gw]
        self.images = 0
        self.maps: list[torch.Tensor] = []  # [gh, gw] each, the first `keep` images
        self.pixels: list[torch.Tensor] = []

    def update(self, masks: list[torch.Tensor], token_mask: torch.Tensor, pixels: torch.Tensor | None = None) -> None:
        """masks: one [B, T, E] gate mask per MoE layer; token_mask [B, T]."""
        real = token_mask.bool()
        counts = [m.sum(-1) for m in masks]  # L x [B, T] experts per token
        if not self.hists:
            self.hists = [torch.zeros(m.shape[-1] + 1, dtype=torch.long) for m in masks]
        for hist, c in zip(self.hists, counts):
            hist += torch.bincount(c[real].cpu(), minlength=len(hist))
        if self.patch_grid is not None:
            prefix, gh, gw = self.patch_grid
            per_patch = torch.stack(counts).float().mean(0)[:, prefix:].reshape(-1, gh, gw).cpu()  # [B, gh, gw]
            self.patch_sum = per_patch.sum(0) if self.patch_sum is None else self.patch_sum + per_patch.sum(0)
            self.images += len(per_patch)
            take = self.keep - len(self.maps)
            if take > 0:
                self.maps.extend(per_patch[:take])
                if pixels is not None:
                    self.pixels.extend(pixels[:take].cpu())

    def result(self) -> dict:
        layers = []
        for layer, hist in enumerate(self.hists):
            tokens = max(int(hist.sum()), 1)
            mean = float((hist * torch.arange(len(hist))).sum()) / tokens
            layers.append({"layer": layer, "experts_per_token": mean, "experts_hist": hist.tolist()})
        out = {"layers": layers}
        if self.patch_sum is not None:
            out["patch_experts"] = (self.patch_sum / max(self.images, 1)).tolist()  # [gh][gw]
        return out
