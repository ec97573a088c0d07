"""`split`: cut each FFN into equal experts by balanced k-means on the unit-normalised rows of W1.
No training. Clustering uses `k-means-constrained` (min = max cluster size = d_ff / E)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention import projection_slots
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
                 assign: Callable[[FFN, int], list[torch.Tensor]],
                 attention: tuple[int, int] | None = None) -> torch.nn.Module:
    """Replace every FFN of the model, in place, by an MoE whose experts `assign(ffn, E)` gives,
    each with a fresh (untrained) router. attention = (experts, router hidden width): also cut the
    MLPs that replaced the attention projections (attention.py)."""
    slots = [(parent, attr, num_experts, router_hidden) for parent, attr in adapter.ffn_slots(model)]
    if attention is not None:
        slots += [(parent, attr, *attention) for parent, attr in projection_slots(adapter, model)]
    for parent, attr, experts, hidden in slots:
        ffn: FFN = getattr(parent, attr)
        if not isinstance(ffn, FFN):
            raise ValueError(f"{type(ffn).__name__} at .{attr} of {type(parent).__name__}: expected an FFN "
                             "(attention projections become MLPs in the attention phase)")
        router = Router(ffn.w1.in_features, experts, hidden, router_kind)
        setattr(parent, attr, MoE.from_ffn(ffn, assign(ffn, experts), router))
    return model


def split_model(adapter, model: torch.nn.Module, num_experts: int, router_hidden: int,
                router_kind: str = "regression", seed: int = 0, n_init: int = 3,
                attention: tuple[int, int] | None = None) -> torch.nn.Module:
    """The split phase: experts by balanced k-means on each FFN's W1. The routers' kind changes no
    parameter shape, so one split serves both kinds."""
    torch.manual_seed(seed)
    return replace_ffns(adapter, model, num_experts, router_hidden, router_kind,
                        lambda ffn, experts: balanced_clusters(ffn.w1.weight, experts, seed, n_init), attention)


def moe_skeleton(adapter, model: torch.nn.Module, num_experts: int, router_hidden: int,
                 router_kind: str = "regression", attention: tuple[int, int] | None = None) -> torch.nn.Module:
    """MoE layers of the right shapes with a trivial expert assignment, for loading saved weights."""
    return replace_ffns(adapter, model, num_experts, router_hidden, router_kind,
                        lambda ffn, experts: list(torch.arange(ffn.w1.out_features).chunk(experts)), attention)
