"""A model's architecture as a plain (JSON-ready) description, and the one function that builds it.

The pipeline describes the architecture each phase's weights load into from the config
(`describe`); a converted model's folder keeps the description of its final one (the "experts"
entry of d2dmoe.json, export.model_spec) and `d2dmoe.load` builds from that. Both build through
`build`, so a phase that changes the architecture changes it here only.

    {"attention": null, or the projection MLPs: {"hidden": width, and once split "num_experts",
                  "router_hidden"} (folders saved before attention.width hold no "hidden": the
                  projection-sized width),
     "activation": null before sparsify (the model's own FFNs), then "relu" (the swap) or "keep",
     once split: "num_experts", "expert_size", "router_hidden", "router_kind"}
"""
from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from .attention import install_projection_mlps, projection_hidden
from .models import Dims
from .phases.split import moe_skeleton
from .validate import num_experts, router_hidden

STAGES = ("dense", "attention", "sparse", "moe")  # in the order the phases reach them


def describe(cfg: DictConfig, dims: Dims, stage: str) -> dict:
    """The architecture at `stage`: dense, attention (projections as MLPs, when converted), sparse
    (the FFNs' activation swapped, or kept) or moe (FFNs, and converted projections, cut into experts)."""
    reached = STAGES[:STAGES.index(stage) + 1]
    a, r = cfg.attention, cfg.routing.router
    attention = {"hidden": projection_hidden(dims.d, a.width)} if a.convert and "attention" in reached else None
    description = {"attention": attention, "activation": cfg.sparsity.activation if "sparse" in reached else None}
    if stage == "moe":
        E = num_experts(cfg, dims)
        description.update(num_experts=E, expert_size=dims.d_ff // E, router_hidden=router_hidden(cfg, dims),
                           router_kind=r.kind)
        if attention:
            attention.update(num_experts=int(a.num_experts), router_hidden=int(a.router_hidden))
    return description


def build(adapter, num_labels: int | None, description: dict) -> nn.Module:
    """The adapter's model, without weights, in the described architecture."""
    model = adapter.build(num_labels, weights=False)
    attention = description.get("attention")
    if attention:
        h = projection_hidden(adapter.dims(num_labels).d)
        install_projection_mlps(adapter, model, width=attention.get("hidden", h) / h)
    if description.get("activation") is not None:
        adapter.install_ffns(model, nn.ReLU() if description["activation"] == "relu" else None)
    if "num_experts" in description:
        moe_skeleton(adapter, model, description["num_experts"], description["router_hidden"],
                     description["router_kind"],
                     (attention["num_experts"], attention["router_hidden"]) if attention else None)
    return model
