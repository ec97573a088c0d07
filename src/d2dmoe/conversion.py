"""Converting one model to a cost budget: the phases (pipeline.convert), then the operating point
(a global tau, and with `convert.per_layer` a tau per MoE layer) chosen on the validation split
only, then measured on the test split. `d2dmoe convert` (cli.py) and `d2dmoe.convert` (api.py)
both run `convert_to_budget`; nothing in the choice reads a test number."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import pipeline
from .calibrate import layer_calibration, measure
from .export import ConvertedModel, choose_tau, model_spec, save
from .crossover import set_impl
from .moe import DynamicKGate, free_scratch, set_gate, set_layer_taus
from .validate import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Conversion:
    model: nn.Module  # the converted model at its operating point: the original's class (export.ConvertedModel)
    dense: nn.Module  # the reference it was converted from
    spec: dict  # d2dmoe.json: the architecture, the operating point, validation calibration, held-out measurement
    folder: Path | None = None  # where it was saved, if it was

    @property
    def tau(self) -> float:
        return self.spec["tau"]

    @property
    def points(self) -> list[dict]:
        """Every measured operating point, each with its split: the dense reference, each global tau
        on validation, each per-layer allocation on validation (convert.per_layer), and the chosen
        operating point on the held-out split (marked `chosen`)."""
        s, m = self.spec, self.spec["measured"]
        rows = [{"split": m["split"], "method": "dense", "rel_cost": 1.0, "value": m["dense_value"]}]
        rows += [{"split": "validation", "method": "d2dmoe", **r} for r in s["calibration"]]
        rows += [{"split": "validation", "method": "d2dmoe", "per_layer": True, **r}
                 for r in s.get("layer_calibration") or []]
        operating = {"taus": s["layer_taus"]} if s.get("layer_taus") else {"tau": s["tau"]}
        return rows + [{"method": "d2dmoe", "chosen": True, **operating, **m}]


def has_split(data, split: str) -> bool:
    return len(data.splits[split]) > 0


def convert_to_budget(cfg: DictConfig, progress: bool = False, out: str | Path | None = None) -> Conversion:
    """Every phase for `cfg` (artifacts reused), the tau of best validation metric within
    `convert.budget` (validation rel_cost), measured on test (on validation again when the data has
    no test split, and `measured.split` says so); saved to `out` when given."""
    from tqdm.auto import tqdm

    if pipeline.training_free(cfg):
        raise ConfigError("method", f"{cfg.method.name} is a training-free baseline for run.py's curves; d2dmoe "
                                    "convert converts with D2DMoE (leave method at its default)")
    budget = cfg.convert.budget
    ctx, dense, moe = pipeline.convert(cfg)
    metric = ctx.adapter.task.metric
    held_out = "test" if has_split(ctx.data, "test") else "validation"
    set_impl(moe, cfg.experts.impl)
    calibration = []
    for tau in tqdm(list(cfg.routing.taus), desc="tau search on validation", disable=not progress):
        set_gate(moe, DynamicKGate(float(tau)))
        calibration.append({"tau": float(tau), **measure(ctx, moe, "validation")})
    chosen = choose_tau(calibration, budget, metric)
    if chosen["rel_cost"] > budget:
        log.warning("no tau of routing.taus is within the budget %g on validation: the cheapest, tau %g (rel_cost "
                    "%.3f), is taken; add higher taus, or train sparser (sparsity.alpha)", budget, chosen["tau"],
                    chosen["rel_cost"])
    operating = {"tau": chosen["tau"], "layer_taus": None}
    if cfg.convert.per_layer:  # a tau per layer, chosen the same way; the global choice kept for comparison
        layer_rows = layer_calibration(ctx, moe, list(cfg.convert.layer_taus), calibration,
                                       cfg.convert.profile_batches)
        chosen_layers = choose_tau(layer_rows, budget, metric)
        operating.update(layer_taus=chosen_layers["taus"], layer_calibration=layer_rows)
    # every choice made: only now the held-out split
    set_gate(moe, DynamicKGate(chosen["tau"]))
    measured = measure(ctx, moe, held_out)
    if cfg.convert.per_layer:
        set_layer_taus(moe, chosen_layers["taus"])
        operating["global_measured"], measured = {"split": held_out, **measured}, measure(ctx, moe, held_out)
    reference = measure(ctx, dense, held_out)
    free_scratch()
    spec = {**model_spec(OmegaConf.to_container(cfg.model, resolve=True), moe, ctx.dims.num_labels
                         if ctx.adapter.task.head_from_labels else None, cfg.sparsity.activation, cfg.routing.router.kind,
                         pipeline.attention_experts(cfg)),
            "metric": metric, "budget": budget, "calibration": calibration, **operating,
            "measured": {"split": held_out, **measured, "dense_value": reference["value"]}}
    folder = save(out, moe, spec, ctx.data.tokenizer) if out is not None else None
    return Conversion(ConvertedModel.wrap(moe, ctx.adapter, spec), dense, spec, folder)
