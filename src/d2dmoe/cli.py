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

from omegaconf import DictConfig

log = logging.getLogger(__name__)
CONF_PACKAGE = "pkg://d2dmoe.conf"  # the configs (d2dmoe.conf), as Hydra finds them in an installed package
USAGE = __doc__.split("\n\n")[1]
HELP = f"""usage:
{USAGE}

commands:
  convert    convert a dense model into a dynamic-k MoE and save it (d2dmoe convert --help)
  info       describe a converted model folder (d2dmoe info --help)"""
CONVERT_HELP = """usage: d2dmoe convert [KEY=VALUE ...]

Converts a dense model (every phase: dense reference, sparsify, split, routers, as run.py runs them,
reusing the same artifacts), picks the tau whose validation metric is best within the budget,
measures it on the test split and saves the converted model.

keys:
  budget=FLOAT       the largest validation rel_cost allowed (convert.budget; default 0.5)
  out=DIR            where to save the converted model (convert.out)
  per_layer=BOOL     also calibrate a tau per MoE layer to the budget (convert.per_layer)
  model.path=DIR     your own model (a transformers or timm folder, or a hub id with offline=false);
                     its adapter is read from the folder (model=auto)
  data=NAME          the data: bbc_news (default), carer, bbc_news_lm, fashion_mnist, imagenet, ...
  data.path=PATH     where the data are (a folder of train/val/test files, one file, or a hub name)

Any other key of run.py's config groups works too (model, data, sparsity, experts, routing, ...:
README.md, "Configuring and sweeping"); `d2dmoe convert --hydra-help` shows Hydra's own help.

examples:
  d2dmoe convert budget=0.5
  d2dmoe convert model.path=/models/my-roberta data=carer data.path=/data/emotion budget=0.4 out=my-moe"""
INFO_HELP = """usage: d2dmoe info DIR

Describes a converted model folder (written by d2dmoe convert or save_pretrained): its family,
experts, routers, operating tau, and the test and validation numbers measured when it was made."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    wants_help = any(a in ("-h", "--help") for a in rest)
    if command in ("-h", "--help"):
        print(HELP)
        return 0
    if command == "info":
        if wants_help or len(rest) != 1:
            print(INFO_HELP, file=sys.stdout if wants_help else sys.stderr)
            return 0 if wants_help else 2
        print(info(rest[0]))
        return 0
    if command == "convert":
        if wants_help:
            print(CONVERT_HELP)
            return 0
        import hydra

        sys.argv = [sys.argv[0], *convert_overrides(["--help" if a == "--hydra-help" else a for a in rest])]
        hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="config")(convert_job)()
        return 0
    print(HELP if command is None else f"d2dmoe: unknown command {command!r}\n\n{HELP}", file=sys.stderr)
    return 2


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
    from .conversion import convert_to_budget
    from .job import quiet_libraries

    quiet_libraries()  # the config (convert.* keys among them) is checked once, in pipeline.build_context
    conversion = convert_to_budget(cfg, progress=bool(cfg.trainer.enable_progress_bar), out=cfg.convert.out)
    print(f"\n{info(conversion.folder)}\n", flush=True)
    return conversion.spec


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
