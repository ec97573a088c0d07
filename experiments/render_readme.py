"""Render the README's results section from the JSON files the benchmark and figure scripts write,
so that its numbers cannot drift from them.

    python experiments/render_readme.py           # rewrite the block between the markers in README.md
    python experiments/render_readme.py --check   # exit 1, with a diff, when README.md differs

The block (between `<!-- results:begin -->` and `<!-- results:end -->`) is made from:

- every figure JSON that d2dmoe.claims reads: the claims table, one row per claim of the paper;
- figures/fig_main_default.json (experiments/fig_main.py, from the per-seed data in figures/data/):
  D2DMoE's margin over MoEfication per panel, with figures/fig_main_default.png;
- benchmark/bench_wallclock.json, its "model", "model_int8" and "model_bf16" rows (experiments/bench_wallclock.py):
  the converted default at each tau against its dense model, counted cost, metric and wall time, in
  float32, int8 and bfloat16;
- figures/choose_sparsity*.json (experiments/choose_on_validation.py): how the default's and
  minilm_carer's sparsity settings were chosen on validation, and whether each preset uses the choice;
- every benchmark/*.json that experiments/benchmark.py wrote (a "wall_s" key): one row per preset;
- every figures/curve_*.json (experiments/fig_curve.py): one run's curve, test beside validation.

experiments/reproduce.py makes every figure JSON from the committed data, then runs this script.

Every number says the split it was measured on: the JSON's own "split" key where it has one, else
the split the script that wrote it measures on (SPLIT_OF; tests/test_readme.py checks those scripts).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from d2dmoe.claims import CLAIMS, PENDING, findings, overall
from d2dmoe.evidence import describe
from d2dmoe.results import TOLERANCE, cheapest_within, label
from d2dmoe.tasks import sign
from d2dmoe.thresholds import RULES as THRESHOLD_RULES

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
MAIN_JSON = "figures/fig_main_default.json"
MAIN_FIGURE = "figures/fig_main_default.png"
WALLCLOCK_JSON = "benchmark/bench_wallclock.json"
# choose_on_validation.py's files: the preset each chooses for (None: the built-in default), the sweep
# that makes it (python run.py -m experiment=...), and whose settings they are
CHOSEN = {"figures/choose_sparsity.json": (None, "choose_sparsity", "The default's"),
          "figures/choose_sparsity_carer.json": ("minilm_carer", "choose_sparsity_carer", "`experiment=minilm_carer`'s")}
BENCHMARK_DIR = "benchmark"
CURVES = "figures/curve_*.json"  # experiments/fig_curve.py
# the main figure's benchmark targets per panel: the mean lowest rel_cost within the bar (1 point of
# accuracy, 2% of loss)
CHEAPEST_TARGET = {"minilm/bbc_news": 0.42, "minilm/carer": 0.45, "gpt2_tiny/bbc_news_lm": 0.55,
                   "vit_fashion/fashion_mnist": 0.45}
DEFAULT_PANEL = "minilm/bbc_news"  # the built-in default's model and data
# each panel's sweep (python run.py -m experiment=...), what it runs on, and its folder under figures/data
PANEL_EXPERIMENT = {"minilm/bbc_news": ("fig_main", "the built-in default's MiniLM-L6 on BBC News", "fig_main_bbc"),
                    "minilm/carer": ("fig_main_carer", "MiniLM-L6 on CARER", "fig_main_carer"),
                    "gpt2_tiny/bbc_news_lm": ("fig_main_gpt2", "GPT-2 4 x 256 from scratch on BBC News text",
                                              "fig_main_gpt2"),
                    "vit_fashion/fashion_mnist": ("fig_main_vit", "a ViT 4 x 128 from scratch on Fashion-MNIST",
                                                  "fig_main_vit")}
# said of timings made before repeated items left the splits (d2dmoe.dedup; their JSON has no dedup: true)
BEFORE_DEDUP = ("made on the splits as they were before repeated articles were removed: 26 of the 445 BBC News "
                "test articles were copies of training articles and 10 of validation ones")
SLOWEST_TARGET = 1.05  # the target: the converted model's wall time / dense at most this at every tau
INT8_SPEEDUP_TARGET = 4.0  # the target: converted + int8 against dense float32, within the bar

# The split each script measures on, for JSON files that do not say. benchmark.py and fig_main.py read
# run.py's points.jsonl, whose points pipeline.evaluate_phase measures on the test split (each point
# carries "split": "test"); bench_wallclock.py's whole-model rows run over the test dataloader.
SPLIT_OF = {"benchmark.py": "test", "fig_main.py": "test", "bench_wallclock.py": "test", "fig_curve.py": "test"}
# bench_wallclock.py's model rows; the other key is the metric
ROW_KEYS = {"tau", "rel_cost", "time_ratio", "ms", "val_rel_cost", "val_value"}


def split_of(data: dict, script: str) -> str:
    return data.get("split") or SPLIT_OF[script]


def value(metric: str, v: float) -> str:
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.3f}"


def bar(metric: str, tolerance: float) -> str:
    if metric == "loss":
        return f"loss at most {100 * tolerance:g}% above dense"
    return f"accuracy at most {100 * tolerance:g} point{'s' if tolerance != 0.01 else ''} below dense"


def claims(root: Path) -> list[str]:
    """The claims table (d2dmoe.claims): per claim, what we measured, where, and the verdict."""
    out = ["Each claim of the paper against what the committed data gives (`d2dmoe.claims`; test split, choices "
           "made on validation, 95% intervals over seeds and test examples). A verdict is `reproduced` where "
           "every interval it rests on excludes 0 on the claimed side, `not reproduced` where one excludes it on "
           "the other, `inconclusive` otherwise, and `pending` where the figure's data is not committed yet.", "",
           "| claim (the paper) | our measurement (test, mean [95% interval]) | verdict | made by |", "|---|---|---|---|"]
    for claim in CLAIMS:
        found = findings(claim, root / "figures")
        if found is None:
            out.append(f"| {claim.statement} | pending: `figures/{claim.figure}` has no committed data | {PENDING} "
                       f"| `{claim.command}` |")
            continue
        measured = "<br>".join(f"{f.where}: {f.measured} ({f.verdict})" for f in found)
        out.append(f"| {claim.statement} | {measured} | {overall([f.verdict for f in found])} | `{claim.command}` |")
    return out + [""]


def main_figure(root: Path) -> list[str]:
    if not (root / MAIN_JSON).exists():
        return ["The main figure (D2DMoE against MoEfication, three seeds per panel) is pending: no panel's per-seed "
                "data is committed under `figures/data/`. Make a panel with `python run.py -m experiment=fig_main` "
                "(or `fig_main_carer`, `fig_main_gpt2`, `fig_main_vit`), then `python experiments/reproduce.py "
                "--collect <sweep dir> --as <panel folder> && python experiments/reproduce.py`.", ""]
    panels = json.loads((root / MAIN_JSON).read_text())
    runs = "; ".join(f"`python run.py -m experiment={PANEL_EXPERIMENT[p][0]}` ({PANEL_EXPERIMENT[p][1]})"
                     for p in panels if p in PANEL_EXPERIMENT)
    sweeps = list(dict.fromkeys(d for s in panels.values() for d in s.get("sweeps", [])))
    out = [f"D2DMoE against MoEfication: {runs}; their per-seed results are committed under `figures/data/` (the "
           "commands that made them in each folder's `commands.txt`), and `python experiments/reproduce.py` "
           f"(`python experiments/fig_main.py --results {' '.join(sweeps)} --name fig_main_default`) wrote "
           f"`{MAIN_JSON}` and the figure from them. "
           "Each seed trains its own dense reference (until validation stops improving, at "
           "most `dense.epochs`), "
           "sparsified model and routers; both methods' routers get the same search over learning rate and "
           "epochs, and each keeps, per seed, the setting best on validation. Choices are made on the "
           "validation split, numbers reported on the test split; brackets are 95% intervals: over seeds "
           "(Student t) for the dense model and the cheapest point; for the margins, a Student t over "
           "seeds widened by a bootstrap of the test examples, on which the seeds are paired "
           "(its coverage checked by simulation: [docs/figures.md](docs/figures.md)).", "",
           f"![D2DMoE against MoEfication]({MAIN_FIGURE})", ""]
    for panel, s in panels.items():
        metric, c, m = s["metric"], s["cheapest_within"], s["d2dmoe_minus_moefication"]
        seeds = ", ".join(map(str, s["seeds"]))
        taus = ", ".join(f"{r['tau']:g}" if r else "none" for r in c["per_seed"].values())
        worst = m["worst"]
        lead = m["moefication_leads_excluding_0"]
        out += [f"`{panel}` on the test split, seeds {seeds}, D2DMoE at alpha {s['alpha']:g}; {dense_runs(s)}:", "",
                "| | test, mean [95% interval] |", "|---|---|",
                f"| dense reference {metric} | {describe(s['dense'], 'value', metric)} |",
                f"| lowest rel_cost with validation {metric} within the bar ({bar(metric, c['tolerance'])}); "
                f"taus {taus} | {describe(c['rel_cost'], 'cost', metric)} |",
                f"| its test {metric} minus dense | {describe(c['minus_dense'], 'margin', metric)} |",
                *(f"| D2DMoE minus MoEfication at rel_cost {cost} | {describe(row, 'margin', metric)} |"
                  for cost, row in m["at"].items()),
                f"| D2DMoE minus MoEfication at its worst point of the shared range "
                f"({'none' if worst is None else format(worst['rel_cost'], '.3f')}) | {describe(worst, 'margin', metric)} |",
                "",
                f"Shared rel_cost range (test) {m['shared_range'][0]:.3f} to {m['shared_range'][1]:.3f}; MoEfication ahead "
                f"with an interval excluding 0: {'nowhere' if lead is None else f'from rel_cost {lead[0]:.3f} to {lead[1]:.3f}'}. "
                f"With {len(s['seeds'])} seed(s) the test intervals over seeds have {len(s['seeds']) - 1} degree(s) of "
                "freedom, so they are wide.",
                "", targets(panel, c, m), "", *search_edges(s)]
        gap = c["minus_dense"]["mean"]
        if gap is not None and metric == "accuracy" and gap < -c["tolerance"]:  # the bar held on validation only
            out += [f"On the test split the points chosen on validation average {100 * -gap:.2f} points below "
                    f"dense: past the {100 * c['tolerance']:g}-point bar they keep on validation.", ""]
        if o := s.get("d2dmoe_minus_moefication_original"):  # MoEfication's own router, where the sweep ran it
            parts = margin_parts(o, metric)
            lead = o["moefication_leads_excluding_0"]
            out += [f"D2DMoE minus MoEfication with its original router (`routing/router=moefication_original`: "
                    f"unit-normalised input, started at the experts' centroids; seeds {', '.join(map(str, o['seeds']))}, "
                    f"test): {'; '.join(parts)}; that router ahead with an interval excluding 0: "
                    f"{'nowhere' if lead is None else f'from rel_cost {lead[0]:.3f} to {lead[1]:.3f}'}.", ""]
        for name in THRESHOLD_RULES:  # the training-free baselines, where the sweep ran them
            if b := s.get(f"d2dmoe_minus_{name}"):
                parts = margin_parts(b, metric)
                lead = b[f"{name}_leads_excluding_0"]
                span = "none" if b["shared_range"] is None else f"{b['shared_range'][0]:.3f} to {b['shared_range'][1]:.3f}"
                out += [f"D2DMoE minus {name.upper()} (`method={name}`: training-free, thresholds calibrated on training "
                        f"batches to each target sparsity; seeds {', '.join(map(str, b['seeds']))}, test, shared rel_cost "
                        f"range {span}): {'; '.join(parts) or 'no shared cost range'}; {name.upper()} ahead with an "
                        f"interval excluding 0: {'nowhere' if lead is None else f'from rel_cost {lead[0]:.3f} to {lead[1]:.3f}'}.",
                        ""]
        others = {a: row for a, row in s.get("by_alpha", {}).items() if not math.isclose(float(a), s["alpha"])}
        for a, row in others.items():  # the same comparison at the other alphas run
            parts = margin_parts(row, metric)
            out += [f"D2DMoE minus MoEfication with D2DMoE at alpha {a} instead (seeds "
                    f"{', '.join(map(str, row['seeds']))}, test): {'; '.join(parts)}.", ""]
        out += moved_on(panel, s)
    for panel in sorted(set(CHEAPEST_TARGET) - set(panels)):
        experiment, what, folder = PANEL_EXPERIMENT[panel]
        out += [f"Pending: the `{panel}` panel ({what}); no per-seed data in `figures/data/{folder}` yet "
                f"(`python run.py -m experiment={experiment}`).", ""]
    return out


def search_edges(s: dict) -> list[str]:
    """Which method's choices sit on the edge of what its search covered (fig_main's on_edge)."""
    if "on_edge" not in s:
        return []
    said = []
    for method, name in (("d2dmoe", "D2DMoE"), ("moefication", "MoEfication")):
        grid = ", ".join(f"{k} {' / '.join(f'{v:g}' for v in values)}" for k, values in s["searched"][method].items()
                         if len(values) > 1)
        edges = s["on_edge"][method]
        said.append(f"{name} searched {grid or 'one setting'}"
                    + (": its validation choice sits on the grid's edge for " + "; ".join(
                        f"seed {e['seed']} ({e['key']} {e['value']:g}, the {e['edge']})" for e in edges)
                       if edges else ", every validation choice inside the grid"))
    return ["Searches: " + ". ".join(said) + ".", ""]


def dense_runs(s: dict) -> str:
    """What each seed's dense training did, in words (fig_main's dense_training)."""
    said = []
    for seed, t in s.get("dense_training", {}).items():
        if not t:
            said.append(f"seed {seed}: not recorded")
        else:
            said.append(f"seed {seed} kept epoch {t['best_epoch'] + 1} of the {t['epochs_run']} it ran"
                        + (" (the cap stopped it: it might have improved further)" if t["stopped_by"] == "cap" else ""))
    return "dense training: " + "; ".join(said) if said else "dense training not recorded"


def moved_on(panel: str, s: dict) -> list[str]:
    """Where the panel's preset now sets other sparsity settings than the panel ran, said plainly."""
    experiment = PANEL_EXPERIMENT[panel][0] if panel in PANEL_EXPERIMENT else None
    if experiment is None:
        return []
    ran = {"sparsity.alpha": s["alpha"], "sparsity.epochs": s.get("sparsity_epochs")}
    ran = {k: v for k, v in ran.items() if v is not None}  # epochs: absent from older figure files
    now = dict(zip(ran, preset_values(experiment, list(ran))))
    moved = [k for k in ran if not math.isclose(ran[k], now[k])]
    if not moved:
        return []
    return [f"This panel ran D2DMoE at {', '.join(f'`{k}={ran[k]:g}`' for k in ran)}; `experiment={experiment}` now "
            f"sets {', '.join(f'`{k}={now[k]:g}`' for k in moved)} (chosen on validation, below), and the panel has "
            "not been re-run at it.", ""]


def margin_parts(row: dict, metric: str) -> list[str]:
    """A margin summary (fig_main.margins) as phrases: at each checked rel_cost, and at its worst point."""
    parts = [f"at rel_cost {cost} {describe(r, 'margin', metric) if r else 'none (outside the shared range)'}"
             for cost, r in row["at"].items()]
    if row["worst"]:
        parts.append(f"at its worst point ({row['worst']['rel_cost']:.3f}) {describe(row['worst'], 'margin', metric)}")
    return parts


def targets(panel: str, c: dict, m: dict) -> str:
    """The benchmark's targets for a panel, met or missed, said plainly."""
    said = []
    if panel in CHEAPEST_TARGET and c["rel_cost"]["mean"] is not None:
        goal, got = CHEAPEST_TARGET[panel], c["rel_cost"]["mean"]
        said.append(f"mean lowest rel_cost within the bar at most {goal:g}: {'met' if got <= goal else 'missed'} "
                    f"({got:.3f})")
    at = m["at"].get("0.5")
    if at and at.get("lo") is not None:
        said.append(f"interval of D2DMoE minus MoEfication at rel_cost 0.5 above 0: {'met' if at['lo'] > 0 else 'missed'}")
    lead = m["moefication_leads_excluding_0"]
    said.append("no MoEfication lead whose interval excludes 0: " + ("met" if lead is None else "missed"))
    return "Targets, on the test split (the choices made on validation): " + "; ".join(said) + "."


@functools.cache
def preset_config(experiment: str | None):
    """A preset's config as it composes now (the built-in default: None); composed once per process."""
    from hydra import compose, initialize_config_dir

    from d2dmoe.conf import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}"] if experiment else [])


def preset_values(experiment: str | None, keys: list[str]) -> list:
    """The values `keys` take in a preset as its configs compose now (the built-in default: None)."""
    return [OmegaConf.select(preset_config(experiment), k) for k in keys]


def chosen_settings(root: Path) -> list[str]:
    """How presets' sparsity settings were chosen, from experiments/choose_on_validation.py's JSON files,
    and whether each preset uses the choice now."""
    out = []
    for rel, (experiment, sweep, whose) in CHOSEN.items():
        if (root / rel).exists():
            out += chosen_setting(json.loads((root / rel).read_text()), rel, experiment, sweep, whose)
    return out


def chosen_setting(data: dict, rel: str, experiment: str | None, sweep: str, whose: str) -> list[str]:
    keys, metric, test = data["keys"], data["metric"], data["chosen_test"]
    verb = "were" if len(keys) > 1 else "was"
    command = data.get("command", "python experiments/choose_on_validation.py")
    out = [f"{whose} {' and '.join(f'`{k}`' for k in keys)} {verb} chosen on validation: `python run.py -m "
           f"experiment={sweep}{'' if experiment is None else ' data.path=...'} && {command}` (`{rel}`). Each "
           f"setting's score is its lowest validation rel_cost whose validation {metric} is within the bar "
           f"({bar(metric, test['tolerance'])}, against its own dense reference), averaged over seeds (lower is "
           "better; a seed with no such point counts as 1).",
           "", "| " + " | ".join(f"`{k}`" for k in keys) + " | seeds | validation score (per seed) |",
           "|" + "---|" * (len(keys) + 2)]
    for row in data["settings"]:
        per_seed = ", ".join(f"{c:.3f}" for c in row["val_rel_cost_per_seed"])
        out.append("| " + " | ".join(f"{row[k]:g}" for k in keys)
                   + f" | {', '.join(map(str, row['seeds']))} | {row['val_rel_cost']:.3f} ({per_seed}) |")
    chosen = ", ".join(f"`{k}={v:g}`" for k, v in data["chosen"].items())
    found = test["rel_cost"]["n"]
    rows = data["settings"]
    gap = ""
    if len(rows) > 1:
        first, second = (r["val_rel_cost_per_seed"] for r in rows[:2])
        gap = f" Its score is {rows[1]['val_rel_cost'] - rows[0]['val_rel_cost']:.3f} below the next setting's"
        gap += (f"; their per-seed scores overlap ({min(first):.3f}-{max(first):.3f} against {min(second):.3f}-"
                f"{max(second):.3f}), so these seeds do not separate the two." if min(second) <= max(first) else ".")
    now = preset_values(experiment, keys)
    preset = "The built-in default" if experiment is None else f"`experiment={experiment}`"
    differ = [f"`{k}={v:g}`" for k, v, c in zip(keys, now, data["chosen"].values()) if not math.isclose(v, c)]
    uses = (f" {preset} uses it." if not differ else
            f" {preset} still sets {', '.join(differ)}: it has not been moved to the choice yet.")
    out += ["", f"Chosen: {chosen}.{gap}{uses} Its chosen points on the test split: "
            + (f"rel_cost {describe(test['rel_cost'], 'cost', metric)}, {metric} minus dense "
               f"{describe(test['minus_dense'], 'margin', metric)} ({found} seed(s))." if found
               else "none within the bar."), ""]
    return out


def wallclock(root: Path) -> list[str]:
    if not (root / WALLCLOCK_JSON).exists():
        return []
    data = json.loads((root / WALLCLOCK_JSON).read_text())
    rows = data["model"]
    split = split_of(data, "bench_wallclock.py")
    metric = next(k for k in rows[0] if k not in ROW_KEYS)
    setting = " ".join(f"`{o}`" for o in data["model_overrides"]) or "the built-in default"
    points = [{**r, "method": "dense" if r["tau"] is None else "converted", "metric": metric, "value": r[metric]}
              for r in rows]
    dense = next(p for p in points if p["method"] == "dense")
    best = cheapest_within(points) if all("val_value" in p for p in points) else None  # chosen on validation
    device = f"CPU: {data['model_cpu']}" if data.get("model_cpu") else "CPU, processor not recorded"
    cells = ["dense" if r["tau"] is None else f"{r['tau']:g}" for r in rows]
    made = (f" as the code of commit {data['model_commit']} trains it" if data.get("model_commit") else "")
    out = [f"The converted model at each tau against its dense model ({setting}{made}; `{WALLCLOCK_JSON}`, "
           f"written by `python experiments/bench_wallclock.py`): counted cost, {split} {metric}, and wall "
           f"time over the whole {split} split (the median of {data['model_repeats']} passes, "
           f"{data['threads']} threads, {device}) as a fraction of the dense model's"
           + ("." if data.get("model_dedup") else f"; {BEFORE_DEDUP}."), "",
           "| tau | " + " | ".join(cells) + " |",
           "|---|" + "---|" * len(cells),
           f"| rel_cost ({split}) | " + " | ".join(f"{r['rel_cost']:.3f}" for r in rows) + " |",
           f"| {split} {metric} | " + " | ".join(value(metric, r[metric]) for r in rows) + " |",
           f"| wall time / dense ({split}) | " + " | ".join(f"{r['time_ratio']:.3f}" for r in rows) + " |", ""]
    said = []
    if best is not None:
        speed = dense["ms"] / best["ms"]
        said.append(f"The cheapest point whose validation {metric} is within the bar ({bar(metric, TOLERANCE[metric])}) "
                    f"is tau {best['tau']:g}: rel_cost {best['rel_cost']:.3f}, {value(metric, best['value'])} ({split}), "
                    f"{speed:.2f}x faster than dense ({best['ms'] / 1000:.2f} s against "
                    f"{dense['ms'] / 1000:.2f} s per pass over the {split} split).")
    slower = [f"{r['tau']:g}" for r in rows if r["tau"] is not None and r["time_ratio"] > 1]
    impl = data.get("model_impl", "gather")
    if slower:
        said.append(f"Slower than dense over the {split} split (wall time / dense above 1) at tau "
                    f"{', '.join(slower)}, with `experts.impl={impl}`: "
                    "[docs/results.md](docs/results.md#wall-clock-time) has the per-layer measurements.")
    worst = max(r["time_ratio"] for r in rows if r["tau"] is not None)
    said.append(f"Target, wall time / dense at most {SLOWEST_TARGET} at every tau: "
                f"{'met' if worst <= SLOWEST_TARGET else 'missed'} ({worst:.3f} at worst).")
    out.append(" ".join(said))
    return out + [""] + [line for lower in LOWER_PRECISIONS
                         for line in wallclock_lower(data, dense, metric, split, *lower)]


# the whole-model rows in a lower precision: (key, name, how the two models were made, speed target)
LOWER_PRECISIONS = (
    ("model_int8", "int8", "the dense model through torch's one-line `quantize_dynamic`, and the converted model "
     "through `d2dmoe.int8.converted_int8`; the experts' execution chosen by `experts.impl={impl}` among int8 "
     "masked, int8 gather and float32 gather", INT8_SPEEDUP_TARGET),
    ("model_bf16", "bfloat16", "both models cast with `.bfloat16()`, inputs under CPU autocast; the experts' "
     "execution chosen by `experts.impl={impl}` among masked and gather", None),
)


def wallclock_lower(data: dict, dense: dict, metric: str, split: str, key: str, name: str, how: str,
                    target: float | None) -> list[str]:
    """One lower precision's rows: the dense model and the converted one, both in it; every time
    against the dense float32 model."""
    rows = data.get(key)
    if not rows:
        return []
    points = [{**r, "method": "dense" if r["tau"] is None else "converted", "metric": metric, "value": r[metric]}
              for r in rows]
    low = next(p for p in points if p["method"] == "dense")
    cells = [f"dense {name}" if r["tau"] is None else f"{r['tau']:g}" for r in rows]
    out = [f"The same in {name} on the CPU (`{key}`: {how.format(impl=data.get('model_impl', 'gather'))}). "
           "Wall time as a fraction of the dense float32 model's.", "",
           "| tau | " + " | ".join(cells) + " |",
           "|---|" + "---|" * len(cells),
           f"| rel_cost ({split}) | " + " | ".join(f"{r['rel_cost']:.3f}" for r in rows) + " |",
           f"| {split} {metric} | " + " | ".join(value(metric, r[metric]) for r in rows) + " |",
           f"| wall time / dense float32 ({split}) | " + " | ".join(f"{r['time_ratio']:.3f}" for r in rows) + " |",
           ""]
    said = [f"Dense {name}: {dense['ms'] / low['ms']:.2f}x faster than dense float32, "
            f"{value(metric, low['value'])} against {value(metric, dense['value'])} ({split})."]
    # within the bar of the dense float32 model, chosen on validation
    best = cheapest_within([dense, *[p for p in points if p["method"] != "dense"]])
    if best is None:
        said.append(f"No {name} converted point has a validation {metric} within the bar of dense float32.")
    else:
        speed = dense["ms"] / best["ms"]
        said.append(f"The cheapest {name} converted point whose validation {metric} is within the bar of dense "
                    f"float32 is tau {best['tau']:g}: {value(metric, best['value'])} ({split}), {speed:.2f}x faster "
                    "than dense float32." + ("" if target is None else f" Target at least {target:g}x: "
                                             f"{'met' if speed >= target else 'missed'}."))
    # as accurate as the dense model in the same precision on validation, and faster?
    as_good = [p for p in points if p["method"] != "dense" and sign(metric) * (p["val_value"] - low["val_value"]) >= 0]
    rival = min(as_good, key=lambda p: p["val_rel_cost"], default=None)
    goal = f"Target (ahead of dense {name} at its accuracy)" if target is not None else f"Ahead of dense {name}"
    if rival is None:
        said.append(f"No {name} converted point reaches dense {name}'s validation {metric}: "
                    f"{goal[0].lower() + goal[1:]} missed.")
    else:
        said.append(f"Of the {name} converted points at least as good as dense {name} on validation, the cheapest "
                    f"is tau {rival['tau']:g}: {value(metric, rival['value'])} against dense {name}'s "
                    f"{value(metric, low['value'])} ({split}), {low['ms'] / rival['ms']:.2f}x dense {name}'s "
                    f"speed. {goal}: {'met' if rival['ms'] < low['ms'] else 'missed'}.")
    return out + [" ".join(said), ""]


def benchmarks(root: Path) -> list[str]:
    found = []
    for path in sorted((root / BENCHMARK_DIR).glob("*.json")):
        data = json.loads(path.read_text())
        # written by experiments/benchmark.py, with its cheapest point chosen on validation
        if isinstance(data, dict) and "wall_s" in data and data.get("chosen_on") == "validation":
            found.append((path, data))
    found.sort(key=lambda f: (f[1]["overrides"] != [], f[0].name))  # the built-in default first
    if not found:
        return ["No preset has been timed by `python experiments/benchmark.py` since its cheapest point is chosen on "
                "validation; the earlier rows, chosen on test, are in [docs/results.md](docs/results.md#benchmark).",
                ""]
    out = ["One row per preset: `python experiments/benchmark.py [overrides]` times `run.py` (every phase "
           "trained in a fresh artifacts folder unless given `--artifacts`) and writes `benchmark/<name>.json`. "
           "The cheapest point is the converted point of lowest validation rel_cost whose validation metric is "
           "within the bar, reported on test. Each wall time is one "
           "run; [docs/results.md](docs/results.md#benchmark) records the machines and what else ran alongside."
           + "".join(f" `{p.relative_to(root).as_posix()}` was {BEFORE_DEDUP}." for p, d in found if not d.get("dedup")),
           "",
           "| preset | file | wall time (CPUs) | dense | bar | cheapest rel_cost within the bar | at |",
           "|---|---|---|---|---|---|---|"]
    for path, d in found:
        metric, split = d["metric"], split_of(d, "benchmark.py")
        preset = " ".join(f"`{o}`" for o in d["overrides"]) or "the built-in default"
        rel = path.relative_to(root).as_posix()
        if d["best_rel_cost"] is None:
            cheapest, there = f"none ({split})", "no converted point within the bar"
        else:
            at = f"tau {d['best_tau']:g}" if d["best_tau"] is not None else f"k {d['best_k']}"
            cheapest = f"{d['best_rel_cost']:.3f} ({split})"
            there = (f"{at}: {metric} {value(metric, d['best_value'])}, "
                     f"{d['best_experts_per_token']:.1f} experts/token")
        out.append(f"| {preset} | `{rel}` | {d['wall_s']:.0f} s ({d['threads']}) "
                   f"| {metric} {value(metric, d['dense_value'])} ({split}) | {bar(metric, d['tolerance'])} "
                   f"| {cheapest} | {there} |")
    return out + [""]


def curves(root: Path) -> list[str]:
    """One run's curve per figures/curve_*.json: its figure, its points on test and validation, and the
    cheapest point within the bar chosen on validation, or plainly none."""
    out = []
    for path in sorted(root.glob(CURVES)):
        c = json.loads(path.read_text())
        metric, split, dense, pts = c["metric"], split_of(c, "fig_curve.py"), c["dense"], c["points"]
        what = f"`{c['model']}` on `{c['data']}`"
        out += [f"One run's curve, {what} ({c['method']} at alpha {c['alpha']:g}, {c['num_experts']} experts, "
                f"seed {c['seed']}; one seed, so no interval), reported on the {split} split and chosen on "
                f"validation: `{c['command']}`, then `{c['made_by']}` (`{path.relative_to(root).as_posix()}`).", "",
                f"![{c['model']} on {c['data']}]({path.with_suffix('.png').relative_to(root).as_posix()})", "",
                f"| point ({split} unless it says validation) | dense | " + " | ".join(label(p) for p in pts) + " |",
                "|---|" + "---|" * (len(pts) + 1),
                f"| rel_cost ({split}) | 1.000 | " + " | ".join(f"{p['rel_cost']:.3f}" for p in pts) + " |",
                f"| {split} {metric} | {value(metric, dense['value'])} | "
                + " | ".join(value(metric, p["value"]) for p in pts) + " |",
                f"| validation {metric} | {value(metric, dense['val_value'])} | "
                + " | ".join(value(metric, p["val_value"]) for p in pts) + " |",
                f"| experts/token ({split}) | | " + " | ".join(f"{p['experts_per_token']:.1f}" for p in pts) + " |", ""]
        best = c["cheapest"]
        if best is not None:
            out.append(f"The cheapest point whose validation {metric} is within the bar ({bar(metric, c['tolerance'])}) "
                       f"is {label(best)}: rel_cost {best['rel_cost']:.3f}, {metric} {value(metric, best['value'])} "
                       f"against dense's {value(metric, dense['value'])} ({split}).")
        else:
            near = max(pts, key=lambda p: sign(metric) * p["val_value"])
            out.append(f"No converted point keeps the dense quality on validation ({bar(metric, c['tolerance'])}): "
                       f"the closest, {label(near)} at rel_cost {near['val_rel_cost']:.3f}, has a validation {metric} "
                       f"of {value(metric, near['val_value'])} against dense's {value(metric, dense['val_value'])}.")
        out.append("")
    return out


def render(root: Path = ROOT) -> str:
    """The block's text between the markers (the markers excluded)."""
    lines = ["<!-- made by `python experiments/render_readme.py` from the JSON files named below: "
             "edit those (or the script), not this block -->", "",
             *claims(root), *main_figure(root), *chosen_settings(root), *wallclock(root), *benchmarks(root),
             *curves(root)]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_block(readme: str, block: str) -> str:
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {BEGIN} and {END}, in that order")
    return readme[:start + len(BEGIN)] + "\n" + block + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the rendering")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--root", type=Path, default=ROOT, help="where figures/ and benchmark/ are")
    args = parser.parse_args(argv)

    current = args.readme.read_text()
    rendered = replace_block(current, render(args.root))
    if args.check:
        if rendered == current:
            return 0
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                   str(args.readme), "rendered"))
        print(f"{args.readme} differs from the JSON files: run python experiments/render_readme.py", file=sys.stderr)
        return 1
    if rendered != current:
        args.readme.write_text(rendered)
        print(f"rewrote the results block of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
