"""Config checks that run before any compute. Each error names the key and what is allowed."""
from __future__ import annotations

from omegaconf import DictConfig

from .attention import INITS, projection_hidden
from .models import ADAPTERS, Dims
from .moe import IMPLS, ROUTER_KINDS, fused_unavailable
from .sparsity import PENALTIES

SCHEDULES = ("constant", "linear", "linear_warmup")
ACTIVATIONS = ("relu", "keep")
RULES = ("dynk", "topk", "both")  # both: dynamic-k and top-k evaluated on the same routers


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def check_config(cfg: DictConfig) -> None:
    """Checks that need no model or data."""
    family = cfg.model.get("family")
    if family not in ADAPTERS:
        raise ConfigError("model.family", f"unknown model family {family!r}; allowed: {sorted(ADAPTERS)}")
    s = cfg.sparsity
    if s.alpha < 0:
        raise ConfigError("sparsity.alpha", f"must be >= 0, got {s.alpha}")
    if s.attention_scale < 0:
        raise ConfigError("sparsity.attention_scale", f"must be >= 0, got {s.attention_scale}")
    if s.attention_lr is not None and not s.attention_lr > 0:
        raise ConfigError("sparsity.attention_lr", f"must be > 0 or null (the sparsify lr), got {s.attention_lr}")
    if s.penalty not in PENALTIES:
        raise ConfigError("sparsity.penalty", f"unknown penalty {s.penalty!r}; allowed: {sorted(PENALTIES)}")
    if s.schedule not in SCHEDULES:
        raise ConfigError("sparsity.schedule", f"unknown schedule {s.schedule!r}; allowed: {list(SCHEDULES)}")
    if s.activation not in ACTIVATIONS:
        raise ConfigError("sparsity.activation", f"unknown choice {s.activation!r}; allowed: {list(ACTIVATIONS)}")
    e = cfg.experts
    if (e.num_experts is None) == (e.expert_size is None):
        raise ConfigError("experts", "set exactly one of experts.num_experts and experts.expert_size "
                                     f"(the other to null); got {e.num_experts} and {e.expert_size}")
    for key in ("num_experts", "expert_size"):
        if e[key] is not None and e[key] < 1:
            raise ConfigError(f"experts.{key}", f"must be >= 1, got {e[key]}")
    if e.get("impl", "masked") not in IMPLS:
        raise ConfigError("experts.impl", f"unknown execution {e.impl!r}; allowed: {list(IMPLS)}")
    if e.get("impl") == "fused" and (reason := fused_unavailable()):
        raise ConfigError("experts.impl", reason)
    a = cfg.attention
    if a.convert:
        if family == "llama":
            raise ConfigError("attention.convert", "not supported for gated-FFN LLMs (model.family=llama): "
                                                   "their grouped-query K/V projections are not d -> d")
        for key in ("num_experts", "router_hidden"):
            if a[key] < 1:
                raise ConfigError(f"attention.{key}", f"must be >= 1, got {a[key]}")
        if not a.width > 0:
            raise ConfigError("attention.width", f"must be > 0 (a multiple of the cost-neutral width), got {a.width}")
        if a.init not in INITS:
            raise ConfigError("attention.init", f"unknown init {a.init!r}; allowed: {list(INITS)}")
    r = cfg.routing
    if r.router.kind not in ROUTER_KINDS:
        raise ConfigError("routing.router.kind", f"unknown router {r.router.kind!r}; allowed: {list(ROUTER_KINDS)}")
    if r.rule not in RULES:
        raise ConfigError("routing.rule", f"unknown rule {r.rule!r}; allowed: {list(RULES)}")
    if r.rule in ("dynk", "both"):
        if not r.get("taus"):
            raise ConfigError("routing.taus", "empty list; give at least one tau in [0, 1]")
        for tau in r.taus:
            if not 0.0 <= tau <= 1.0:
                raise ConfigError("routing.taus", f"tau={tau} is outside [0, 1]")
    if r.rule in ("topk", "both"):
        if not r.get("ks"):
            raise ConfigError("routing.ks", "empty list; give at least one k >= 1")
        for k in r.ks:
            if k < 1:
                raise ConfigError("routing.ks", f"k={k} must be >= 1")


def num_experts(cfg: DictConfig, dims: Dims) -> int:
    e = cfg.experts
    return int(e.num_experts) if e.num_experts is not None else dims.d_ff // int(e.expert_size)


def check_model(cfg: DictConfig, dims: Dims) -> None:
    """Checks that need the model's shape (read from its config, no weights)."""
    e = cfg.experts
    if e.num_experts is not None and dims.d_ff % e.num_experts:
        raise ConfigError("experts.num_experts",
                          f"{e.num_experts} does not divide the FFN width {dims.d_ff} of model {cfg.model.name}")
    if e.expert_size is not None and dims.d_ff % e.expert_size:
        raise ConfigError("experts.expert_size",
                          f"{e.expert_size} does not divide the FFN width {dims.d_ff} of model {cfg.model.name}")
    a = cfg.attention
    h = projection_hidden(dims.d, a.width)
    if a.convert and h % a.num_experts:
        raise ConfigError("attention.num_experts",
                          f"{a.num_experts} does not divide the projection MLPs' width {h} (attention.width={a.width} "
                          f"x round((d^2 + d) / (2d + 1)), d={dims.d}) of model {cfg.model.name}")
    if cfg.routing.rule in ("topk", "both"):
        E = num_experts(cfg, dims)
        for k in cfg.routing.ks:
            if k > E:
                raise ConfigError("routing.ks", f"k={k} exceeds the number of experts {E}")
