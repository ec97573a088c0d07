"""Activation sparsity: capturing FFN activations, the penalties on them, the alpha schedule."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .moe import FFN, MoE

EPS = 1e-8


def square_hoyer(a: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """||a||_1^2 / ||a||_2^2 over the last dim: 1 for one-hot, n for a uniform vector of length n."""
    return a.abs().sum(-1).pow(2) / (a.pow(2).sum(-1) + eps)


def l1(a: torch.Tensor) -> torch.Tensor:
    return a.abs().sum(-1)


PENALTIES = {"hoyer": square_hoyer, "l1": l1}


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token values [B, T] over real tokens (mask [B, T], 1 = real)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def penalty(activations: list[torch.Tensor], mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token penalty averaged over real tokens, then over layers. activations: L x [B, T, F]."""
    fn = PENALTIES[kind]
    return torch.stack([masked_token_mean(fn(a), mask) for a in activations]).mean()


def grouped_penalty(groups: list[list[torch.Tensor]], mask: torch.Tensor, kind: str,
                    weights: list[float] | None = None) -> torch.Tensor:
    """The weighted sum over groups of layers (the FFNs; the MLPs that replaced attention
    projections) of each group's `penalty`: converting the attention projections adds their own
    term and leaves the FFNs' as strong as it is without them (a mean over all layers would dilute
    it 5x for MiniLM). weights: one per group, 1 when not given."""
    weights = [1.0] * len(groups) if weights is None else weights
    return sum(w * penalty(group, mask, kind) for group, w in zip(groups, weights) if group)


def alpha_at(alpha: float, schedule: str, step: int, total_steps: int) -> float:
    """alpha_t. linear_warmup: alpha * min(t / (T/2), 1); linear: alpha * t / T; constant: alpha."""
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        return alpha * min(step / max(total_steps, 1), 1.0)
    if schedule == "linear_warmup":
        return alpha * min(step / max(total_steps / 2, 1), 1.0)
    raise ValueError(f"unknown sparsity.schedule {schedule!r}; allowed: constant, linear, linear_warmup")


@contextmanager
def capture_activations(model: nn.Module, kind: str | None = None):
    """Yields a list that fills, on each forward, with the output of every FFN/MoE activation [B, T, F]
    (or of those of one kind: "ffn", or "attention" for the MLPs that replaced attention projections)."""
    store: list[torch.Tensor] = []
    handles = [m.act.register_forward_hook(lambda _m, _i, out: store.append(out))
               for m in model.modules() if isinstance(m, (FFN, MoE)) and kind in (None, m.kind)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
