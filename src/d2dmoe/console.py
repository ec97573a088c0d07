"""The `d2dmoe` command.

    d2dmoe convert [Hydra overrides] convert.budget=0.5 convert.out=DIR   # convert, pick tau, save
    d2dmoe info DIR                                                       # what a saved model is

`convert` is a Hydra job like run.py (the same config groups, reusing the same artifacts): it runs
the phases, measures every `routing.taus` value on the validation split, picks the tau with the
best validation metric whose validation rel_cost is within the budget, measures that tau on the
test split and saves the model (export.py).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[2] / "conf"  # the repository's configs (editable install)
USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"] and len(argv) == 2:
        print(info(argv[1]))
        return 0
    if argv[:1] == ["convert"]:
        import hydra

        if not CONF.is_dir():
            sys.exit(f"d2dmoe convert reads the repository's conf/ ({CONF} is missing): install with pip install -e")
        sys.argv = [sys.argv[0], *argv[1:]]
        hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(convert_job)()
        return 0
    sys.exit(f"usage:\n{USAGE}")


def convert_job(cfg: DictConfig) -> dict:
    from . import pipeline
    from .export import choose_tau, model_spec, save
    from .moe import DynamicKGate, free_scratch, set_gate, set_impl
    from .phases.evaluate import Evaluation
    from .validate import ConfigError, check_config

    check_config(cfg)
    budget = cfg.convert.budget
    if budget is None or budget <= 0:
        raise ConfigError("convert.budget", f"a target rel_cost > 0 (e.g. 0.5), got {budget}")
    ctx, dense, moe = pipeline.convert(cfg)
    metric = ctx.adapter.task.metric
    set_impl(moe, cfg.experts.impl)
    calibration = []
    for tau in cfg.routing.taus:
        set_gate(moe, DynamicKGate(float(tau)))
        ev = ctx.test(Evaluation(moe.eval(), ctx.adapter, ctx.dims), split="validation")
        calibration.append({"tau": float(tau), "rel_cost": ev.macs / ev.dense_macs, "value": ev.value})
    chosen = choose_tau(calibration, budget, metric)
    set_gate(moe, DynamicKGate(chosen["tau"]))
    test = ctx.test(Evaluation(moe.eval(), ctx.adapter, ctx.dims))
    reference = ctx.test(Evaluation(dense.eval(), ctx.adapter, ctx.dims))
    free_scratch()
    measured = {"split": "test", "rel_cost": test.macs / test.dense_macs, "value": test.value,
                "dense_value": reference.value, "experts_per_token": test.experts_per_token}
    spec = {**model_spec(OmegaConf.to_container(cfg.model, resolve=True), moe, ctx.dims.num_labels
                         if metric != "loss" else None, cfg.sparsity.activation, cfg.routing.router.kind,
                         pipeline.attention_experts(cfg)),
            "metric": metric, "tau": chosen["tau"], "budget": budget, "calibration": calibration,
            "measured": measured}
    out = save(cfg.convert.out, moe, spec, ctx.data.tokenizer)
    print(f"\n{info(out)}\n", flush=True)
    return spec


def info(path: str | Path) -> str:
    """A saved model's family, experts, tau, and its measured test rel_cost and metric."""
    from .export import CONFIG

    folder = Path(path)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG} (not a converted model folder)")
    spec = json.loads((folder / CONFIG).read_text())
    e, m = spec["experts"], spec["measured"]
    lines = [f"{folder}: {spec['adapter'].get('name')} ({spec['family']}), metric {spec['metric']}",
             f"experts: {e['num_experts']} per FFN of {e['expert_size']} neurons, router {e['router_kind']} "
             f"(hidden {e['router_hidden']}), activation {e['activation']}"
             + (f"; attention projections: {e['attention']['num_experts']} experts each" if e["attention"] else ""),
             f"tau {spec['tau']:g} (budget {spec['budget']:g}, chosen on validation)",
             (f"{m['split']}: rel_cost {m['rel_cost']:.4f}, {spec['metric']} {m['value']:.4f} "
             f"(dense {m['dense_value']:.4f}), {m['experts_per_token']:.2f} experts per token"),
             "validation calibration: " + ", ".join(f"tau {r['tau']:g}: {r['rel_cost']:.3f} / {r['value']:.4f}"
                                                     for r in spec["calibration"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
