"""Runs the phases in order: dense -> [attention] -> sparsify -> split -> routers -> evaluate.
`PHASES` is the only place that knows the order. Each phase is an artifact named by the config it
depends on, so a run reuses whatever an earlier run with the same upstream config produced."""
from __future__ import annotations

import copy
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .architecture import build, describe
from .artifacts import INFO, Artifact
from .attention import finish_distillation, install_projection_mlps
from .early_stopping import KeepBest
from .models import Dims
from .crossover import set_impl
from .moe import AllExperts, DynamicKGate, TopKGate, free_scratch, set_gate
from .phases.attention import AttentionDistillation
from .phases.evaluate import Evaluation, Reference
from .phases.finetune import TaskTraining
from .phases.guard import out_of_memory_hint
from .phases.routers import RouterTraining
from .phases.split import split_model
from .resume import AtomicCheckpointIO, last_checkpoint, resume_callbacks
from .stats import ActivationStats, ExpertUse
from .thresholds import RULES as THRESHOLD_RULES
from .thresholds import Target, calibrate, set_target, thresholded_layers
from .thresholds import install as install_thresholds
from .validate import (ConfigError, check_config, check_model, config_keys, nearest_entry, num_experts,
                       router_hidden)

log = logging.getLogger(__name__)

# what a phase's data depends on: batch sizes and limits shape training; the cache dir does not
DATA_KEYS_IGNORED = ("cache_dir", "eval_batch_size")
EXPERT_KEYS_IGNORED = ("impl",)  # how experts execute changes no weights
ATTENTION_SPLIT_KEYS = ("convert", "num_experts", "router_hidden")  # not the distillation's settings
SPARSITY_ATTENTION_KEYS = ("attention_scale", "attention_lr")  # act only on converted projections
# settings added after artifacts already existed: left out of the hash while they keep the behaviour
# that came before them, so those artifacts keep their names
ADDED_WITH_DEFAULT = {"sparsity": {"activation": "relu", "attention_scale": 1.0, "attention_lr": None},
                      "router": {"kind": "regression"}, "attention": {"width": 1}, "model": {"layout": None},
                      "data": {"dedup": False}}


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def spec_of(node, group: str) -> dict:
    added = ADDED_WITH_DEFAULT.get(group, {})
    return {k: v for k, v in plain(node).items() if not (k in added and v == added[k])}


def training_free(cfg: DictConfig) -> bool:
    """A baseline that thresholds the dense model's FFNs (method=cats, teal): nothing after dense trains."""
    return cfg.method.name in THRESHOLD_RULES


def sparse_activation(cfg: DictConfig) -> nn.Module | None:
    """The FFN activation sparsify trains with: ReLU (the method), or None to keep the model's own."""
    return nn.ReLU() if cfg.sparsity.activation == "relu" else None


def attention_experts(cfg: DictConfig) -> tuple[int, int] | None:
    """(experts, router hidden width) of the attention projections' MoE layers; None unless converted."""
    a = cfg.attention
    return (int(a.num_experts), int(a.router_hidden)) if a.convert else None


@dataclass
class Context:
    cfg: DictConfig
    adapter: object
    data: L.LightningDataModule
    dims: Dims
    wandb_run: object = None  # the job's W&B run; each training phase logs to it under its own prefix

    def new_model(self, stage: str) -> nn.Module:
        """The architecture a phase's weights load into (architecture.STAGES), without weights."""
        return build(self.adapter, self.dims.num_labels, describe(self.cfg, self.dims, stage))

    def fit(self, module: L.LightningModule, settings: DictConfig, phase: str) -> L.Trainer:
        """Train a phase with Lightning; from its last checkpoint if an earlier attempt left one."""
        module.phase = phase
        logger = False
        if self.wandb_run is not None:
            from lightning.pytorch.loggers import WandbLogger

            logger = WandbLogger(experiment=self.wandb_run, prefix=phase)
        work_dir = artifacts(self.cfg)[phase].work_dir
        resuming = resume_callbacks(work_dir, self.cfg.checkpoint_every)
        # train while validation improves, keeping the best weights (the dense reference)
        stopping = [KeepBest(self.adapter.task.metric, settings.patience)] if settings.get("patience") else []
        trainer = instantiate(self.cfg.trainer, max_epochs=settings.epochs, max_steps=settings.get("max_steps", -1),
                              logger=logger, callbacks=resuming + stopping, enable_checkpointing=bool(resuming),
                              plugins=[AtomicCheckpointIO()] if resuming else None)
        ckpt = last_checkpoint(work_dir)
        if ckpt:
            log.info("resuming %s from %s", phase, ckpt)
        else:
            log.info("training %s", phase)
        with out_of_memory_hint(phase, self.data):
            trainer.fit(module, datamodule=self.data, ckpt_path=ckpt, weights_only=True)
        return trainer

    def test(self, module: L.LightningModule, split: str = "test", batches: int | None = None) -> L.LightningModule:
        """Run `module` over the test (or validation) split, or over its first `batches` batches."""
        # one process: the metric and cost sums accumulate in this module (trainer=ddp trains only)
        trainer = instantiate(self.cfg.trainer, logger=False, strategy="auto", devices=1, enable_progress_bar=False,
                              limit_test_batches=1.0 if batches is None else batches)
        with out_of_memory_hint("evaluate", self.data):
            if split == "test":
                trainer.test(module, datamodule=self.data, verbose=False)
            else:
                trainer.test(module, dataloaders=self.data.val_dataloader(), verbose=False)
        return module


def build_context(cfg: DictConfig, wandb_run=None) -> Context:
    check_config(cfg)
    check_artifact_keys(cfg)
    adapter = instantiate(cfg.model)
    check_model(cfg, adapter.dims(num_labels=1))  # shapes come from the model's config: no weights, no data
    data = instantiate(cfg.data)
    data.train_seed = cfg.seed  # seeds differ in the training order too, not only in initialisation and dropout
    data.tokenizer = adapter.tokenizer(data)  # None for images; may be trained on the data's training texts
    data.prepare_data()
    data.setup()
    dims = adapter.dims(data.num_labels)
    # the FFN layout fits (tokenizer known: a language model's vocabulary is)
    adapter.check_layout(data.num_labels if adapter.task.head_from_labels else None, bool(cfg.attention.convert))
    return Context(cfg, adapter, data, dims, wandb_run)


def check_artifact_keys(cfg: DictConfig) -> None:
    """Every key must have an ARTIFACT_KEYS decision: one without would silently reuse artifacts
    trained without it (or retrain needlessly)."""
    for key in config_keys(cfg):
        if nearest_entry(ARTIFACT_KEYS, key) is None:
            raise ConfigError(key, "not known to the artifact names: add it to pipeline.ARTIFACT_KEYS with the "
                                   "phases it changes, or why it changes none")


def world_size(trainer: DictConfig) -> int:
    """Processes that train together (their batches make one global batch): devices x nodes."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if devices in ("auto", -1, "-1"):  # every GPU there is; one process on the CPU
        import torch

        gpu = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        devices = torch.cuda.device_count() if gpu else 1
    count = len(devices) if not isinstance(devices, int) else devices
    return count * int(trainer.get("num_nodes", 1))


def trainer_spec(cfg: DictConfig) -> dict:
    """The Trainer settings that change what a phase learns, those at their default left out."""
    t = cfg.trainer
    precision = str(t.get("precision", "32-true"))
    spec = {"world_size": world_size(t), "precision": PRECISION_ALIASES.get(precision, precision),
            "accumulate_grad_batches": t.get("accumulate_grad_batches", 1),
            "gradient_clip_val": t.get("gradient_clip_val"),
            "gradient_clip_algorithm": t.get("gradient_clip_algorithm") or "norm"}
    if spec["gradient_clip_val"] is None:  # the algorithm acts only with a value
        spec["gradient_clip_algorithm"] = "norm"
    return {k: v for k, v in spec.items() if v != TRAINER_DEFAULTS[k]}


def artifacts(cfg: DictConfig) -> dict[str, Artifact]:
    """Every phase's artifact in the config's chain (PHASES): each spec holds the phase's own
    settings (ARTIFACT_KEYS says which key enters which) and its upstream's key."""
    trainer = {"trainer": t} if (t := trainer_spec(cfg)) else {}  # only for trained phases
    out, upstream = {}, None
    for phase in chain(cfg):
        spec = {**phase.spec(cfg), **(module_spec(cfg, phase) | trainer if phase.trained else {})}
        upstream = out[phase.name] = Artifact(cfg.artifacts_dir, phase.name, spec, upstream)
    return out


def module_spec(cfg: DictConfig, phase: "Phase") -> dict:
    """What conf/module sets for the phase beyond its group's keys: a class other than the built-in
    one, and any value other than the group's (the defaults interpolate them). Empty at the defaults,
    so artifact names stay."""
    node, group = plain(cfg.module[phase.name]), plain(OmegaConf.select(cfg, phase.settings))
    own = {k: v for k, v in node.items() if k not in ("_target_", "_partial_") and v != group.get(k)}
    built_in = f"{phase.module.__module__}.{phase.module.__qualname__}"
    if node["_target_"] != built_in:
        own["_target_"] = node["_target_"]
    return {"module": own} if own else {}


def dense_spec(cfg: DictConfig) -> dict:
    data = {k: v for k, v in spec_of(cfg.data, "data").items() if k not in DATA_KEYS_IGNORED}
    spec = {"model": spec_of(cfg.model, "model"), "data": data, "dense": plain(cfg.dense), "seed": cfg.seed}
    # with early stopping, validation chooses the weights: how much of it runs is part of the model
    if cfg.dense.get("patience") and cfg.trainer.get("limit_val_batches", 1.0) != 1.0:
        spec["limit_val_batches"] = cfg.trainer.limit_val_batches
    return spec


def attention_spec(cfg: DictConfig) -> dict:
    return {"attention": {k: v for k, v in spec_of(cfg.attention, "attention").items()
                          if k not in ATTENTION_SPLIT_KEYS}}


def sparsify_spec(cfg: DictConfig) -> dict:
    sparsity = spec_of(cfg.sparsity, "sparsity")
    if not cfg.attention.convert:  # settings that change nothing without converted projections
        sparsity = {k: v for k, v in sparsity.items() if k not in SPARSITY_ATTENTION_KEYS}
    return {"sparsity": sparsity}


def split_spec(cfg: DictConfig) -> dict:
    experts = {k: v for k, v in plain(cfg.experts).items() if k not in EXPERT_KEYS_IGNORED}
    spec = {"experts": experts, "router_hidden": cfg.routing.router.hidden}
    if cfg.attention.convert:
        spec["attention"] = {k: cfg.attention[k] for k in ATTENTION_SPLIT_KEYS if k != "convert"}
    return spec


def routers_spec(cfg: DictConfig) -> dict:
    return {"router": spec_of(cfg.routing.router, "router")}


def obtain(ctx: Context, art: Artifact, stage: str, make, upstream=lambda: None) -> nn.Module:
    """The artifact's model if it exists; otherwise `make(upstream())` -> (model, info), saved, then
    returned. The upstream model comes first, then the seed: made (which draws random numbers) or
    loaded, it leaves the phase the same random state, so the phase trains alike either way."""
    def seeded_make():
        base = upstream()
        L.seed_everything(ctx.cfg.seed, verbose=False)
        return make(base)

    return art.obtain(lambda: art.load_into(ctx.new_model(stage)), seeded_make)


def metrics(trainer: L.Trainer) -> dict:
    """The phase's last logged metrics, how many processes trained it, and (early stopping) which
    epoch's weights it kept."""
    kept = next((c.summary for c in trainer.callbacks if isinstance(c, KeepBest)), {})
    return {**{k: float(v) for k, v in trainer.callback_metrics.items()}, "world_size": trainer.world_size, **kept}


def phase_module(ctx: Context, phase: str, model: nn.Module) -> L.LightningModule:
    """The phase's LightningModule, as conf/module builds it (its settings from the phase's group)."""
    return instantiate(ctx.cfg.module[phase])(model, ctx.adapter)


def train_dense(ctx: Context, _: None = None):
    model = ctx.adapter.build(ctx.dims.num_labels)
    s = ctx.cfg.dense
    if s.epochs == 0 or s.get("max_steps", -1) == 0:  # a pretrained model that is the reference as it is
        return model, {}
    trainer = ctx.fit(phase_module(ctx, "dense", model), s, "dense")
    return model, metrics(trainer)


def distill_attention(ctx: Context, dense: nn.Module):
    a = ctx.cfg.attention
    model = install_projection_mlps(ctx.adapter, copy.deepcopy(dense), distill=True, init=a.init,
                                   width=a.width)  # dense stays
    trainer = ctx.fit(phase_module(ctx, "attention", model), a, "attention")
    return finish_distillation(ctx.adapter, model), metrics(trainer)


def sparsify(ctx: Context, base: nn.Module):
    """base: the dense model, or its attention-converted form."""
    model = ctx.adapter.install_ffns(copy.deepcopy(base), sparse_activation(ctx.cfg))  # base stays as it is
    s = ctx.cfg.sparsity
    trainer = ctx.fit(phase_module(ctx, "sparsify", model), s, "sparsify")
    return model, metrics(trainer)


def split(ctx: Context, sparse: nn.Module):
    e, r = ctx.cfg.experts, ctx.cfg.routing.router
    model = split_model(ctx.adapter, sparse, num_experts(ctx.cfg, ctx.dims), router_hidden(ctx.cfg, ctx.dims), r.kind,
                        seed=e.seed, n_init=e.kmeans_n_init, attention=attention_experts(ctx.cfg))
    return model, {}


def train_routers(ctx: Context, moe: nn.Module):
    r = ctx.cfg.routing.router
    trainer = ctx.fit(phase_module(ctx, "routers", moe), r, "routers")
    return moe, metrics(trainer)


@dataclass(frozen=True)
class Phase:
    name: str  # its artifact's name: <name>-<hash>
    stage: str  # the architecture its weights load into (architecture.STAGES)
    make: Callable[[Context, nn.Module | None], tuple[nn.Module, dict]]  # from the previous phase's model
    spec: Callable[[DictConfig], dict]  # the settings it depends on (its artifact's hash)
    settings: str | None = None  # trained phases: the config group of its settings
    module: type | None = None  # trained phases: its built-in LightningModule (conf/module may name another)
    needed: Callable[[DictConfig], bool] = lambda cfg: True

    @property
    def trained(self) -> bool:  # a Trainer runs it, so the Trainer settings that change training join its spec
        return self.module is not None


def converts(cfg: DictConfig) -> bool:
    return not training_free(cfg)


# The phases in order: the only place that knows it. Each starts from the previous needed one.
PHASES = (
    Phase("dense", "dense", train_dense, dense_spec, "dense", TaskTraining),
    Phase("attention", "attention", distill_attention, attention_spec, "attention", AttentionDistillation,
          needed=lambda cfg: bool(cfg.attention.convert)),
    Phase("sparsify", "sparse", sparsify, sparsify_spec, "sparsity", TaskTraining, needed=converts),
    Phase("split", "moe", split, split_spec, needed=converts),
    Phase("routers", "moe", train_routers, routers_spec, "routing.router", RouterTraining, needed=converts),
)


def chain(cfg: DictConfig) -> list[Phase]:
    """The phases this config runs, in order."""
    return [phase for phase in PHASES if phase.needed(cfg)]


TRAINED = tuple(phase.name for phase in PHASES if phase.trained)

# Which phases' artifact names each config key enters (the phases after them change through their
# upstream's key), or why it enters none. An entry covers a key or a whole group; the nearest wins.
# tests/test_artifact_keys.py walks every key of every config against this table, changing each
# value and checking which names change, so a key added later without a decision fails there.
ARTIFACT_KEYS: dict[str, tuple[str, ...] | str] = {
    "seed": ("dense",),
    "model": ("dense",),
    "data": ("dense",),
    "data.cache_dir": "where the tokenised data is cached, not what it is",
    "data.eval_batch_size": "evaluation only",
    "dense": ("dense",),
    "attention": ("attention",),  # the distillation's settings
    "attention.convert": ("attention", "split"),  # adds the phase, and the projections' experts
    "attention.num_experts": ("split",),
    "attention.router_hidden": ("split",),
    "sparsity": ("sparsify",),
    "experts": ("split",),
    "experts.impl": "how evaluation executes the experts; the same outputs",
    "routing.router": ("routers",),
    "routing.router.hidden": ("split", "routers"),  # split makes the untrained routers
    "routing.rule": "evaluation only",
    "routing.taus": "evaluation only",
    "routing.ks": "evaluation only",
    "convert": "`d2dmoe convert`'s tau choice and folder, after the trained phases",
    "method.name": "a label, or a training-free baseline, which trains nothing after dense (its phases' keys "
                   "then enter no name)",
    "method.sparsities": "evaluation only: the baselines' thresholds are calibrated when the points are measured",
    "method.calibration_batches": "evaluation only: the baselines' thresholds are calibrated when the points are "
                                  "measured",
    "logger": "logging only",
    "artifacts_dir": "where artifacts are kept, not what they are",
    "checkpoint_every": "a resumed phase ends with the weights of an uninterrupted one",
    "offline": "whether hubs may be asked; model.* and data.* say what is loaded",
    **{f"module.{phase.name}": (phase.name,) for phase in PHASES if phase.trained},  # module_spec
    **{f"module.{phase.name}._partial_": "how Hydra builds the module (it must be true)" for phase in PHASES
       if phase.trained},
    # the Trainer: what changes the training enters every trained phase (trainer_spec); each key is
    # listed, so a Lightning argument added with +trainer.<name> stops until it is decided here
    "trainer._target_": "the Trainer class",
    **{f"trainer.{k}": "console, logging or checkpoint files only" for k in (
        "enable_checkpointing", "enable_model_summary", "enable_progress_bar", "num_sanity_val_steps",
        "log_every_n_steps")},
    "trainer.precision": TRAINED,
    "trainer.devices": TRAINED,  # the global batch: data.batch_size x processes
    "trainer.num_nodes": TRAINED,
    "trainer.accumulate_grad_batches": TRAINED,
    "trainer.gradient_clip_val": TRAINED,
    "trainer.gradient_clip_algorithm": TRAINED,
    "trainer.strategy": "enters through the global batch (trainer.devices): DDP and FSDP average the same "
                        "gradients (test_ddp_and_fsdp_train_sparsify_and_routers_on_two_cpu_processes)",
    "trainer.accelerator": "the same training on another device",
    "trainer.deterministic": "the same training, with deterministic kernels only",
    "trainer.use_distributed_sampler": "the batch samplers shard batches across processes themselves",
    "trainer.limit_val_batches": ("dense",),  # with dense.patience, validation picks the dense weights
}
# keys that act only beside another: they enter nothing while that one is false or null
ONLY_WITH = {**{k: "attention.convert" for k in ("attention.num_experts", "attention.router_hidden",
                                                 "sparsity.attention_scale", "sparsity.attention_lr")},
             "trainer.gradient_clip_algorithm": "trainer.gradient_clip_val",
             "trainer.limit_val_batches": "dense.patience"}

# Trainer settings that change what is trained, and their defaults: at the default a setting is left
# out of the spec, so artifacts trained before it was hashed keep their names
TRAINER_DEFAULTS = {"world_size": 1, "precision": "32-true", "accumulate_grad_batches": 1,
                    "gradient_clip_val": None, "gradient_clip_algorithm": "norm"}
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def gates(cfg: DictConfig) -> list[tuple[dict, object]]:
    """(point fields, gate) for every value of the routing rule's evaluation list; rule `both`
    evaluates the dynamic-k taus, then the top-k ks, on the same routers. A training-free baseline:
    each target sparsity of method.sparsities (its gate: thresholds.Target)."""
    if training_free(cfg):
        return [({"rule": cfg.method.name, "tau": None, "k": None, "sparsity": float(s)}, Target(float(s)))
                for s in cfg.method.sparsities]
    out = []
    if cfg.routing.rule in ("dynk", "both"):
        out += [({"rule": "dynk", "tau": float(t), "k": None}, DynamicKGate(float(t))) for t in cfg.routing.taus]
    if cfg.routing.rule in ("topk", "both"):
        out += [({"rule": "topk", "tau": None, "k": int(k)}, TopKGate(int(k))) for k in cfg.routing.ks]
    return out


@dataclass
class Results:
    points: list[dict]  # the dense reference first, then one per tau (or k)
    stats: dict = field(default_factory=dict)  # what the figures need beyond the points (stats.py)
    patch_images: list = field(default_factory=list)  # ViTs: the first test images, [C, H, W] each
    patch_maps: list = field(default_factory=list)  # ViTs: per point, [gh, gw] maps of those images
    # split -> key (phases.evaluate.EXAMPLE_KEYS) -> per point, per example: [points, N] (examples.npz)
    examples: dict = field(default_factory=dict)


SPLIT_PREFIX = {"test": "", "validation": "val_"}  # a point's test fields, and their validation twins


def measure_point(ctx: Context, model: nn.Module, reference: Reference, results: Results,
                  expert_use: ExpertUse | None = None) -> dict:
    """The model at its current gates on test and on validation: the point's measured fields
    (value, rel_cost, macs, fidelity, experts per token; val_* for validation), its examples
    appended to `results.examples`. `expert_use` fills on the test split."""
    fields = {}
    for split, prefix in SPLIT_PREFIX.items():
        ev = ctx.test(Evaluation(model.eval(), ctx.adapter, ctx.dims, reference=reference, split=split,
                                 expert_use=expert_use if split == "test" else None), split=split)
        fields |= {f"{prefix}value": ev.value, f"{prefix}rel_cost": ev.rel_cost,
                   f"{prefix}{ctx.adapter.task.fidelity}": ev.fidelity}
        if split == "test":
            fields |= {"macs": ev.macs, "experts_per_token": ev.experts_per_token,
                       "attention_experts_per_token": ev.attention_experts_per_token,
                       **ctx.adapter.task.extra(ev.value)}
        for key, values in ev.examples.items():
            results.examples.setdefault(split, {}).setdefault(key, []).append(values)
    return fields


def thresholded_copy(ctx: Context, dense: nn.Module) -> nn.Module:
    """The dense model with its FFNs thresholded by the baseline's rule, calibrated on the first
    method.calibration_batches training batches (their order the run's seed) to each target."""
    m = ctx.cfg.method
    model = install_thresholds(ctx.adapter, copy.deepcopy(dense).eval(), m.name)
    calibrate(model, ctx.adapter, itertools.islice(ctx.data.train_dataloader(), m.calibration_batches),
              [float(s) for s in m.sparsities], seed=ctx.cfg.seed)
    return model


def select(model: nn.Module, gate) -> None:
    """Set an evaluation point: a gate on every MoE layer, or a baseline's target sparsity
    (AllExperts: its thresholds off, the dense FFNs)."""
    if thresholded_layers(model):
        set_target(model, gate.sparsity if isinstance(gate, Target) else None)
    else:
        set_gate(model, gate)


def evaluate_phase(ctx: Context, dense: nn.Module, moe: nn.Module) -> Results:
    cfg = ctx.cfg
    r = cfg.routing.router
    common = {"model": cfg.model.name, "data": cfg.data.name, "alpha": float(cfg.sparsity.alpha),
              "penalty": cfg.sparsity.penalty, "activation": cfg.sparsity.activation,
              "router": r.kind, "router_lr": float(r.lr), "router_epochs": int(r.epochs),
              "sparsity_epochs": int(cfg.sparsity.epochs),
              "num_experts": num_experts(cfg, ctx.dims), "expert_size": ctx.dims.d_ff // num_experts(cfg, ctx.dims),
              "attention": bool(cfg.attention.convert), "metric": ctx.adapter.task.metric, "split": "test",
              "seed": int(cfg.seed)}
    if training_free(cfg):  # nothing sparsified, split or routed: those settings describe no model here
        common |= dict.fromkeys(("alpha", "penalty", "router", "router_lr", "router_epochs", "sparsity_epochs",
                                 "num_experts", "expert_size"))
        common["activation"] = "keep"
        moe = thresholded_copy(ctx, dense)
    reference = Reference(dense.eval(), ctx.adapter)
    results = Results([])
    results.points.append({**common, "method": "dense", "rule": "dense", "tau": None, "k": None,
                           **measure_point(ctx, dense, reference, results)})
    # how sparse the converted model's activations are: every expert computed, no gate involved
    select(moe, AllExperts())
    # stats.json key -> layers; the projections' MLPs in module order (Q, K, V, O of each block)
    kinds = {"activation": "ffn", **({"attention_activation": "attention"} if cfg.attention.convert else {})}
    activations = {key: ActivationStats(kind) for key, kind in kinds.items()}
    ctx.test(Evaluation(moe.eval(), ctx.adapter, ctx.dims, activations=list(activations.values())))
    results.stats = {**{key: a.result() for key, a in activations.items()}, "points": []}

    set_impl(moe, cfg.experts.impl)
    for fields, gate in gates(cfg):
        select(moe, gate)
        use = ExpertUse(ctx.adapter.patch_grid)
        point = {**common, "method": cfg.method.name, **fields, **measure_point(ctx, moe, reference, results, use)}
        results.points.append(point)
        results.stats["points"].append({**fields, **use.result()})
        if use.maps:
            results.patch_images = use.pixels
            results.patch_maps.append(use.maps)
        log.info("%s: %s %.4f rel_cost %.4f (validation: %.4f, %.4f)", gate, common["metric"], point["value"],
                 point["rel_cost"], point["val_value"], point["val_rel_cost"])
    free_scratch()  # the gather's scratch space is only needed while evaluating
    results.examples = {split: {k: np.stack(v) for k, v in arrays.items()} for split, arrays in results.examples.items()}
    return results


def convert(cfg: DictConfig, wandb_run=None, needs_test: bool = False) -> tuple[Context, nn.Module, nn.Module]:
    """The dense reference and the converted model (routers trained) for one config. Upstream phases
    are loaded or trained only when a downstream artifact is missing. `needs_test`: stop before any
    training when the data has no test split."""
    ctx = build_context(cfg, wandb_run)
    if needs_test and not len(ctx.data.splits["test"]):
        raise ValueError("data.test_fraction=0: the data has no test split, and a run's points are measured on "
                         "test; give the data a test file, or choose an operating point with `d2dmoe convert`")
    arts, phases = artifacts(cfg), chain(cfg)
    models: dict[int, nn.Module] = {}

    def model_of(i: int) -> nn.Module:  # phase i's model: loaded, or made from phase i - 1's
        if i not in models:
            phase = phases[i]
            models[i] = obtain(ctx, arts[phase.name], phase.stage, lambda base: phase.make(ctx, base),
                               lambda: model_of(i - 1) if i else None)
        return models[i]

    dense = model_of(0)
    return ctx, dense, model_of(len(phases) - 1)


def dense_training(cfg: DictConfig) -> dict:
    """What the dense phase's training did (its artifact's info: epochs run, the epoch kept, what
    stopped it; early_stopping.KeepBest.summary), for stats.json; {} for a reference used as it is."""
    info = artifacts(cfg)["dense"].dir / INFO
    keys = ("best_epoch", "epochs_run", "stopped_by", "val_history")
    recorded = json.loads(info.read_text()) if info.exists() else {}
    return {k: v for k, v in recorded.items() if k in keys or k.startswith("best_val_")}


def run(cfg: DictConfig, wandb_run=None) -> Results:
    """All phases for one config; returns the evaluated points (the dense reference first) and stats."""
    results = evaluate_phase(*convert(cfg, wandb_run, needs_test=True))
    results.stats["dense_training"] = dense_training(cfg)
    return results
