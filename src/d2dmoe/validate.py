"""Config checks that run before any compute. Each error names the key and what is allowed.

`CHECKS` decides, for every key of the composed config, how its value is checked, or says why it
is not: a test walks every key of every experiment, so a key added later without a decision fails
it. A key (or group) missing from a config, e.g. an image dataset's keys under a text dataset, is
skipped."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from .attention import INITS, projection_hidden
from .models import ADAPTERS, Dims
from .moe import IMPLS, ROUTER_KINDS, fused_unavailable
from .sparsity import PENALTIES
from .thresholds import RULES as THRESHOLD_RULES

SCHEDULES = ("constant", "linear", "linear_warmup")
ACTIVATIONS = ("relu", "keep")
RULES = ("dynk", "topk", "both")  # both: dynamic-k and top-k evaluated on the same routers
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Rule:
    ok: Callable[[object], bool]
    allowed: str  # what the error message says is allowed


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def at_least(n: int) -> Rule:
    return Rule(lambda v: is_int(v) and v >= n, f"an integer >= {n}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"null or {rule.allowed}")


def one_of(choices) -> Rule:
    """One of the names in `choices` (every choice here is a string)."""
    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of {sorted(choices) if isinstance(choices, dict) else list(choices)}")


def list_of(rule: Rule) -> Rule:
    return Rule(lambda v: isinstance(v, (list, tuple)) and all(rule.ok(x) for x in v), f"a list, each {rule.allowed}")


POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: is_number(v) and v >= 0, "a number >= 0")
FRACTION = Rule(lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
SPLIT_FRACTION = Rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
STEPS = Rule(lambda v: is_int(v) and v >= -1, "-1 (no limit) or an integer >= 0")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TRUE = Rule(lambda v: v is True, "true (the pipeline gives the module its model and adapter)")
INT = Rule(is_int, "an integer")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
TAUS = list_of(FRACTION)

# Trained phases share their settings' names and ranges.
TRAINING = {"epochs": at_least(0), "max_steps": STEPS, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
            "warmup_fraction": FRACTION}

# key (or group: every key under it) -> its Rule, or why it is not checked here
CHECKS: dict[str, Rule | str] = {
    "seed": INT,
    "artifacts_dir": TEXT,
    "checkpoint_every": at_least(0),
    "offline": BOOL,
    "method.name": "a label written into the points; the method is what the other groups set, except for the "
                   "training-free baselines (cats, teal: thresholds.py), which it selects",
    "method.sparsities": Rule(lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(SPLIT_FRACTION.ok(x) for x in v),
                              "a non-empty list, each a number in (0, 1)"),
    "method.calibration_batches": at_least(1),
    # model
    "model._target_": "the adapter class Hydra builds; Hydra names it when it cannot import it",
    "model.name": "a label (artifact names and points)",
    "model.family": one_of([*ADAPTERS, "auto"]),  # auto: read from the model (models/detect.py)
    "model.pretrained": BOOL,
    "model.path": "read by the adapter, which names model.path when nothing is there (check_model, before compute)",
    "model.config": "the architecture's own settings, checked by its config class when check_model reads the shapes",
    "model.tokenizer": "the tokenizer's settings, checked by the tokenizer trainer",
    "model.gguf_file": "a file name inside model.path, named by the loader when missing",
    "model.weights_file": "a file path, named by the loader when missing",
    "model.layout": "the FFN layout, checked by layouts.Layout.from_config (unknown or missing fields, named) when "
                    "check_model reads the shapes; wrong paths are named with the block's class",
    # data
    "data._target_": "the data module class Hydra builds",
    "data.name": "a label (artifact names and points)",
    "data.kind": "checked by the data module it selects, which names data.kind",
    "data.path": "checked by the data module, which names data.path when nothing is there",
    "data.text_column": "checked against the data's columns, named when missing",
    "data.label_column": "checked against the data's columns, named when missing",
    "data.label_names": "null or the labels' names in order; any list",
    "data.delimiter": "null or the delimiter of split files; any string",
    "data.hub_kwargs": "passed to datasets.load_dataset as given",
    "data.mean": "per-channel normalisation; any numbers",
    "data.std": "per-channel normalisation; any numbers",
    "data.cache_dir": "a folder; made when missing",
    "data.max_length": at_least(1),
    "data.image_size": at_least(1),
    "data.batch_size": at_least(1),
    "data.eval_batch_size": at_least(1),
    "data.num_workers": at_least(0),
    "data.split_seed": INT,
    "data.dedup": BOOL,
    "data.val_fraction": SPLIT_FRACTION,
    "data.test_fraction": Rule(lambda v: is_number(v) and 0 <= v < 1,
                               "a number in [0, 1) (0: no test split, for data without a test file)"),
    "data.limit_train": optional(at_least(1)),
    "data.limit_eval": optional(at_least(1)),
    # phases
    **{f"dense.{k}": rule for k, rule in TRAINING.items()},
    "dense.patience": optional(at_least(1)),
    **{f"attention.{k}": rule for k, rule in TRAINING.items()},
    "attention.convert": BOOL,
    "attention.width": POSITIVE,
    "attention.num_experts": at_least(1),
    "attention.router_hidden": at_least(1),
    "attention.init": one_of(INITS),
    **{f"sparsity.{k}": rule for k, rule in TRAINING.items()},
    "sparsity.penalty": one_of(PENALTIES),
    "sparsity.activation": one_of(ACTIVATIONS),
    "sparsity.alpha": NON_NEGATIVE,
    "sparsity.attention_scale": NON_NEGATIVE,
    "sparsity.attention_lr": optional(POSITIVE),
    "sparsity.schedule": one_of(SCHEDULES),
    "experts.num_experts": optional(at_least(1)),
    "experts.expert_size": optional(at_least(1)),
    "experts.kmeans_n_init": at_least(1),
    "experts.seed": INT,
    "experts.impl": one_of(IMPLS),
    **{f"routing.router.{k}": rule for k, rule in TRAINING.items() if k != "warmup_fraction"},
    "routing.router.kind": one_of(ROUTER_KINDS),
    "routing.router.hidden": optional(at_least(1)),  # null: as wide as the expert count (router_hidden)
    "routing.rule": one_of(RULES),
    "routing.taus": TAUS,
    "routing.ks": list_of(at_least(1)),
    # d2dmoe convert
    "convert.budget": POSITIVE,
    "convert.per_layer": BOOL,
    "convert.layer_taus": TAUS,
    "convert.profile_batches": optional(at_least(1)),
    "convert.out": TEXT,
    # the phases' LightningModules: their settings are the phase groups' keys, checked there
    "module": "the phase modules' settings, interpolated from the phase groups, whose keys are checked",
    **{f"module.{phase}._partial_": TRUE for phase in ("dense", "attention", "sparsify", "routers")},
    # logging and the Trainer
    "logger.enabled": BOOL,
    "logger.mode": one_of(WANDB_MODES),
    "logger.project": TEXT,
    "logger.entity": "null or a W&B entity; W&B checks it when it uploads",
    "logger.group": "null or a W&B group name; any string",
    "trainer": "Lightning's own Trainer arguments, checked by Lightning when a phase builds its Trainer",
}


def config_keys(node, prefix: str = "") -> list[str]:
    """Every key of a config that holds a value (an empty group counts as one), dotted, unresolved."""
    keys = []
    for k in node.keys():
        child = node._get_node(k)
        if OmegaConf.is_dict(child) and len(child):
            keys += config_keys(child, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def nearest_entry(table: dict, key: str):
    """The entry of a table of dotted keys (CHECKS, pipeline.ARTIFACT_KEYS) that covers `key`: its
    own, or its nearest group's; None when neither is there."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:n])) in table:
            return table[prefix]
    return None


def value_at(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key, default=KeyError)
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_config(cfg: DictConfig) -> None:
    """Checks that need no model or data."""
    for key, rule in CHECKS.items():
        if not isinstance(rule, Rule):  # decided not to check: nothing to read, nor to resolve
            continue
        value = value_at(cfg, key)
        if value is not KeyError and not rule.ok(value):
            raise ConfigError(key, f"must be {rule.allowed}, got {value!r}")
    family = cfg.model.family
    e = cfg.experts
    if (e.num_experts is None) == (e.expert_size is None):
        raise ConfigError("experts", "set exactly one of experts.num_experts and experts.expert_size "
                                     f"(the other to null); got {e.num_experts} and {e.expert_size}")
    if e.get("impl") == "fused" and (reason := fused_unavailable()):
        raise ConfigError("experts.impl", reason)
    d = cfg.data
    if d.get("val_fraction") is not None and d.get("test_fraction") is not None \
            and d.val_fraction + d.test_fraction >= 1:
        raise ConfigError("data.val_fraction", f"with data.test_fraction={d.test_fraction} leaves no training "
                                               f"data (their sum must be < 1), got {d.val_fraction}")
    if d.get("test_fraction") == 0 and d.get("kind") != "splits":
        raise ConfigError("data.test_fraction", f"0 (no test split) needs data.kind=splits (a source without a test "
                                                f"file); data.kind={d.get('kind')!r} cuts its test split itself")
    if cfg.attention.convert and cfg.method.name in THRESHOLD_RULES:
        raise ConfigError("attention.convert", f"method={cfg.method.name} thresholds the FFNs of the dense model as it is; "
                                               "it converts no attention projections (set attention.convert=false)")
    if cfg.attention.convert and family in ADAPTERS and (reason := ADAPTERS[family].no_attention_conversion):
        raise ConfigError("attention.convert", reason)
    r = cfg.routing
    if r.rule in ("dynk", "both") and not r.get("taus"):
        raise ConfigError("routing.taus", "empty list; give at least one tau in [0, 1]")
    if r.rule in ("topk", "both") and not r.get("ks"):
        raise ConfigError("routing.ks", "empty list; give at least one k >= 1")
    if cfg.convert.per_layer and not cfg.convert.layer_taus:
        raise ConfigError("convert.layer_taus", "empty list; give the per-layer search grid's taus in [0, 1]")


def num_experts(cfg: DictConfig, dims: Dims) -> int:
    e = cfg.experts
    return int(e.num_experts) if e.num_experts is not None else dims.d_ff // int(e.expert_size)


def router_hidden(cfg: DictConfig, dims: Dims) -> int:
    """The FFN routers' hidden width: routing.router.hidden, or the expert count where it is null."""
    hidden = cfg.routing.router.hidden
    return num_experts(cfg, dims) if hidden is None else int(hidden)


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
    if cfg.routing.router.kind == "moefication_original":  # its second layer starts at the identity
        E = num_experts(cfg, dims)
        if router_hidden(cfg, dims) != E:
            raise ConfigError("routing.router.hidden", f"a moefication_original router is as wide as its {E} "
                              f"experts: set null (or {E}), not {cfg.routing.router.hidden}")
        if a.convert and a.router_hidden != a.num_experts:
            raise ConfigError("attention.router_hidden", f"a moefication_original router is as wide as its "
                              f"{a.num_experts} experts (attention.num_experts), not {a.router_hidden}")
