"""Analytic inference cost in multiply-accumulates (MACs) per sample, over real tokens only.

cost = fixed(T) + sum over MoE layers of (T * router_macs + pairs_l * expert_macs),
where pairs_l counts the (token, expert) pairs that ran in layer l, read from the gate masks.
The dense model costs fixed(T) + T * 2 d d_ff per FFN (3 d d_ff when gated). When the attention
projections are MoE layers too (attention.convert), their dense cost leaves fixed(T). A model run
with training-free thresholds (thresholds.py) counts each FFN's weights read, token by token.
"""
from __future__ import annotations

import torch

from .models import Dims
from .moe import MoE, moe_layers
from .thresholds import thresholded_layers


def dense_ffn_macs(tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
    return dims.layers * tokens.double() * dims.ffn_matrices * dims.d * dims.d_ff


def dense_macs(adapter, tokens: torch.Tensor, dims: Dims) -> torch.Tensor:
    """[B] real-token counts -> [B] MACs of the dense model."""
    return adapter.fixed_macs(tokens, dims) + dense_ffn_macs(tokens, dims)


def router_macs(moe: MoE) -> int:
    """Per token: Linear(d, h) then Linear(h, E)."""
    first, _, second = moe.router.net
    return first.in_features * first.out_features + second.in_features * second.out_features


def expert_macs(moe: MoE) -> int:
    """Per (token, expert) pair: W1_e (s x d) and W2_e (d x s), and the up projection when gated."""
    return moe.matrices * moe.d * moe.expert_size


def executed_pairs(moe: MoE, attention_mask: torch.Tensor) -> torch.Tensor:
    """(token, expert) pairs that ran in the last forward, per sample, real tokens only: [B]."""
    per_token = moe.last_mask.sum(-1)  # [B, T]
    return (per_token * attention_mask).sum(-1).double()


def thresholded_model_macs(adapter, model, attention_mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    """MACs per sample of the last forward of a model whose FFNs ran thresholded (thresholds.py):
    the fixed cost and, per layer, each real token's FFN MACs counting only the weights read: [B]."""
    total = adapter.fixed_macs(attention_mask.sum(-1), dims)
    for layer in thresholded_layers(model):
        total = total + (layer.last_macs * attention_mask).sum(-1).double()
    return total


def moe_model_macs(adapter, model, attention_mask: torch.Tensor, dims: Dims) -> torch.Tensor:
    """MACs per sample of the last forward of an MoE model: [B]."""
    tokens = attention_mask.sum(-1)
    total = adapter.fixed_macs(tokens, dims)
    if moe_layers(model, "attention"):  # the projections ran as MoE layers, counted below
        total = total - adapter.projection_macs(tokens, dims)
    for moe in moe_layers(model):
        total = total + tokens.double() * router_macs(moe) + executed_pairs(moe, attention_mask) * expert_macs(moe)
    return total
