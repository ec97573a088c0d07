"""`split`: cut each FFN into equal experts by balanced k-means on the unit-normalised rows of W1.
No training. Clustering uses `k-means-constrained` (min = max cluster size = d_ff / E)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..moe import FFN, MoE, Router


def balanced_clusters(w1: torch.Tensor, num_experts: int, seed: int = 0, n_init: int = 3) -> list[torch.Tensor]:
    """Rows of w1 [F, d] -> E index tensors of F/E neurons each, a partition of range(F)."""
    from k_means_constrained import KMeansConstrained

    size = w1.shape[0] // num_experts
    points = F.normalize(w1.detach().double(), dim=1).cpu().numpy()
    labels = KMeansConstrained(n_clusters=num_experts, size_min=size, size_max=size,
                               random_state=seed, n_init=n_init).fit_predict(points)
    labels = torch.as_tensor(labels)
    return [torch.nonzero(labels == e).flatten() for e in range(num_experts)]


def replace_ffns(adapter, model: torch.nn.Module, num_experts: int, router_hidden: int, router_kind: str,
                 assign: Callable[[FFN], list[torch.Tensor]]) -> torch.nn.Module:
    """Replace every FFN of the model, in place, by an MoE whose experts `assign(ffn)` gives,
    each with a fresh (untrained) router."""
    for parent, attr in adapter.ffn_slots(model):
        ffn: FFN = getattr(parent, attr)
        experts = assign(ffn)
        router = Router(ffn.w1.in_features, num_experts, router_hidden, router_kind)
        setattr(parent, attr, MoE.from_ffn(ffn, experts, router))
    return model


def split_model(adapter, model: torch.nn.Module, num_experts: int, router_hidden: int,
                router_kind: str = "regression", seed: int = 0, n_init: int = 3) -> torch.nn.Module:
    """The split phase: experts by balanced k-means on each FFN's W1. The routers' kind changes no
    parameter shape, so one split serves both kinds."""
    torch.manual_seed(seed)
    return replace_ffns(adapter, model, num_experts, router_hidden, router_kind,
                        lambda ffn: balanced_clusters(ffn.w1.weight, num_experts, seed, n_init))


def moe_skeleton(adapter, model: torch.nn.Module, num_experts: int, router_hidden: int,
                 router_kind: str = "regression") -> torch.nn.Module:
    """MoE layers of the right shapes with a trivial expert assignment, for loading saved weights."""
    return replace_ffns(adapter, model, num_experts, router_hidden, router_kind,
                        lambda ffn: list(torch.arange(ffn.w1.out_features).chunk(num_experts)))
