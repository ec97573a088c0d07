"""The `d2dmoe` command.

    d2dmoe convert [Hydra overrides] convert.budget=0.5 convert.out=DIR   # convert, pick tau, save
    d2dmoe convert model.path=/my/model data=carer budget=0.5              # your model: its adapter read from it
    d2dmoe info DIR                                                       # what a saved model is

`convert` is a Hydra job like run.py (the same config groups, reusing the same artifacts): it runs
the phases, measures every `routing.taus` value on the validation split, picks the tau with the
best validation metric whose validation rel_cost is within the budget, measures that tau on the
test split and saves the model (export.py). With `convert.per_layer=true` it also calibrates a tau
per MoE layer (calibrate.py), picks among those the same way, saves that, and reports the global
tau's test numbers beside it.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

def config_dir() -> Path:
    """The repository's conf/ (a checkout, an editable install), else the copy a built package
    carries (a plain `pip install .`: setup.py puts it in d2dmoe/conf)."""
    repository = Path(__file__).resolve().parents[2] / "conf"
    return repository if (repository / "config.yaml").is_file() else Path(__file__).resolve().parent / "conf"


CONF = config_dir()
USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"] and len(argv) == 2:
        print(info(argv[1]))
        return 0
    if argv[:1] == ["convert"]:
        import hydra

        if not (CONF / "config.yaml").is_file():
            sys.exit(f"d2dmoe convert: no configs in {CONF} (a package built without them): reinstall with pip install .")
        sys.argv = [sys.argv[0], *convert_overrides(argv[1:])]
        hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(convert_job)()
        return 0
    sys.exit(f"usage:\n{USAGE}")


# what users type for `d2dmoe convert`, and the config key it means
SHORT_KEYS = {"budget": "convert.budget", "out": "convert.out", "per_layer": "convert.per_layer"}


def convert_overrides(args: list[str]) -> list[str]:
    """The short forms spelled out (budget=0.5 -> convert.budget=0.5); a model.path without a model
    group reads the model's architecture from the model itself (model=auto)."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        out.append(f"{SHORT_KEYS[key]}={value}" if eq and key in SHORT_KEYS else arg)
    if any(a.startswith("model.path=") for a in out) and not any(a.startswith(("model=", "+model=")) for a in out):
        out.insert(0, "model=auto")
    return out


def convert_job(cfg: DictConfig) -> dict:
    from . import pipeline
    from .calibrate import layer_calibration, measure
    from .export import choose_tau, model_spec, save
    from .job import quiet_libraries
    from .moe import DynamicKGate, free_scratch, set_gate, set_impl, set_layer_taus
    from .validate import check_config

    check_config(cfg)  # the convert.* keys among them
    quiet_libraries()
    budget = cfg.convert.budget
    ctx, dense, moe = pipeline.convert(cfg)
    metric = ctx.adapter.task.metric
    set_impl(moe, cfg.experts.impl)
    calibration = []
    for tau in cfg.routing.taus:
        set_gate(moe, DynamicKGate(float(tau)))
        calibration.append({"tau": float(tau), **measure(ctx, moe, "validation")})
    chosen = choose_tau(calibration, budget, metric)
    set_gate(moe, DynamicKGate(chosen["tau"]))
    test = measure(ctx, moe)
    operating = {"tau": chosen["tau"], "layer_taus": None}
    if cfg.convert.per_layer:  # a tau per layer, chosen the same way; the global choice kept for comparison
        layer_rows = layer_calibration(ctx, moe, list(cfg.convert.layer_taus), calibration,
                                       cfg.convert.profile_batches)
        chosen_layers = choose_tau(layer_rows, budget, metric)
        set_layer_taus(moe, chosen_layers["taus"])
        global_test, test = test, measure(ctx, moe)
        operating.update(layer_taus=chosen_layers["taus"], layer_calibration=layer_rows,
                         global_measured={"split": "test", **global_test})
    reference = measure(ctx, dense)
    free_scratch()
    measured = {"split": "test", **test, "dense_value": reference["value"]}
    spec = {**model_spec(OmegaConf.to_container(cfg.model, resolve=True), moe, ctx.dims.num_labels
                         if ctx.adapter.task.head_from_labels else None, cfg.sparsity.activation, cfg.routing.router.kind,
                         pipeline.attention_experts(cfg)),
            "metric": metric, "budget": budget, "calibration": calibration, **operating, "measured": measured}
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
    chosen = f"(budget {spec['budget']:g}, chosen on validation)"
    operating = (f"a tau per MoE layer {chosen}: " + " ".join(f"{t:g}" for t in spec["layer_taus"])
                 if spec.get("layer_taus") else f"tau {spec['tau']:g} {chosen}")
    lines = [f"{folder}: {spec['adapter'].get('name')} ({spec['family']}), metric {spec['metric']}",
             f"experts: {e['num_experts']} per FFN of {e['expert_size']} neurons, router {e['router_kind']} "
             f"(hidden {e['router_hidden']}), activation {e['activation']}"
             + (projections(e["attention"]) if e["attention"] else ""),
             operating]
    if spec.get("layer_taus"):
        g = spec["global_measured"]
        lines.append(f"{g['split']} with one global tau {spec['tau']:g} instead: rel_cost {g['rel_cost']:.4f}, "
                     f"{spec['metric']} {g['value']:.4f}")
    lines += [(f"{m['split']}: rel_cost {m['rel_cost']:.4f}, {spec['metric']} {m['value']:.4f} "
               f"(dense {m['dense_value']:.4f}), {m['experts_per_token']:.2f} experts per token"),
              "validation, global tau (rel_cost / metric): "
              + ", ".join(f"tau {r['tau']:g}: {scored(r)}" for r in spec["calibration"])]
    if spec.get("layer_calibration"):
        lines.append("validation, a tau per layer at each global tau's predicted cost: "
                     + ", ".join(f"tau {r['tau']:g}: {scored(r)}" for r in spec["layer_calibration"]))
    return "\n".join(lines)


def projections(attention: dict) -> str:
    """The attention projections' experts; folders from before attention.width give no width."""
    size = f" of {attention['hidden'] // attention['num_experts']} neurons" if "hidden" in attention else ""
    return f"; attention projections: {attention['num_experts']} experts each{size}"


def scored(row: dict) -> str:
    return f"{row['rel_cost']:.3f} / {row['value']:.4f}"


if __name__ == "__main__":
    sys.exit(main())
