"""Figure main: test metric against relative cost, D2DMoE (dynamic-k) against MoEfication (top-k),
one panel per model and dataset, over every seed found, with the evidence for the comparison.

    python run.py -m experiment=fig_main && python experiments/fig_main.py
    python run.py -m experiment=fig_main_vit     # adds the ViT panel (fig_main_gpt2: GPT-2; fig_main_carer: CARER)
    python experiments/fig_main.py --results results/fig_main results/other_family --out figures

What the summary (printed, and <name>.json) holds per panel, and where each number comes from:

- `alpha`, `sparsity_epochs`: D2DMoE's sparsity settings in the panel (the epochs from its runs'
  .hydra/config.yaml), so that the README can say when a preset has moved on from them.
- `chosen`: per method and seed, the setting (router lr and epochs, sparsify epochs) the sweep
  searched, chosen on validation (figures.choose_by_seed): each method gets the same search;
  `searched`: the values each method's search covered; `on_edge`: the choices at the lowest or
  highest value searched, where the grid may not hold the optimum.
- `dense`: the dense reference's test metric, mean and 95% t-interval over seeds; `dense_training`,
  per seed, what its training did (epochs run, the epoch kept, whether the patience or the cap
  stopped it; null for runs made before it was recorded).
- `cheapest_within`: per seed, D2DMoE's point of lowest validation rel_cost whose validation metric is
  within 1 point of the dense model's (results.cheapest_within), and its test rel_cost, test metric
  and test distance to dense; their mean and 95% t-interval over seeds.
- `d2dmoe_minus_moefication`: the test margin (positive = D2DMoE better) of the two Pareto frontiers,
  linearly interpolated, averaged over seeds, at rel_cost 0.5 and 0.75, at its worst cost of the
  shared range, and where MoEfication leads with an interval excluding 0; each with a 95% paired
  interval over seeds and test examples (evidence.paired_margins), and each seed's own margin (`per_seed`).
- `by_alpha`: with D2DMoE runs at several alphas for a panel, the same margin for each alpha.
- `d2dmoe_minus_moefication_original`: where the sweep also ran MoEfication with its original router
  (`routing/router=moefication_original`: unit-normalised input, E wide, started at the experts'
  centroids), the same margin against it, on the seeds it has.

The curves drawn are the mean over seeds of each seed's test frontier, with a 95% band over
seeds and test examples (evidence.curve_band); the dense star's bar is the same.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from d2dmoe.evidence import curve_band, describe, t_interval
from d2dmoe.thresholds import RULES as THRESHOLD_RULES
from d2dmoe.figures import (
    COST_GRID,
    COST_LABEL,
    TAU_NOTE,
    MissingRuns,
    cheapest_by_seed,
    choose_by_seed,
    compare,
    default_alpha,
    load_runs,
    metric_label,
    on_edge,
    pyplot,
    save,
    search_grid,
    select_seeds,
)

COMMAND = "python run.py -m experiment=fig_main"
SWEEPS = ("results/fig_main", "results/fig_main_carer", "results/fig_main_vit", "results/fig_main_gpt2")  # a panel each


def margins(d2dmoe: dict, other: dict, resamples: int, rule: str = "topk", name: str = "moefication") -> dict:
    """D2DMoE minus another method (MoEfication, top-k; or a baseline's rule) on the seeds `other`
    has (paired by seed), summarised."""
    out = compare([(d2dmoe[s], "dynk", other[s], rule) for s in sorted(other)], resamples)
    out[f"{name}_leads_excluding_0"] = out.pop("b_leads_excluding_0")
    return {"seeds": sorted(other), **out}


def baselines(runs: list, model: str, data: str, d2d: dict) -> dict[str, dict]:
    """The training-free baselines (method=cats, teal: their rule is their name), per seed, on the
    seeds D2DMoE has; only those the sweep ran."""
    out = {}
    for name in THRESHOLD_RULES:
        want = {"model": model, "data": data, "method": name, "rule": name}
        by_seed = {seed: run for seed, run in choose_by_seed(runs, want).items() if seed in d2d}
        if by_seed:
            out[name] = by_seed
    return out


def original_router(runs: list, model: str, data: str, d2d: dict) -> dict:
    """MoEfication with its original router (routing/router=moefication_original), per seed (each
    seed's router setting chosen on validation), on the seeds D2DMoE has; {} where none ran."""
    want = {"model": model, "data": data, "method": "moefication", "router": "moefication_original", "rule": "topk"}
    return {seed: run for seed, run in choose_by_seed(runs, want).items() if seed in d2d}


def panel_alphas(runs: list, model: str, data: str) -> list[float]:
    """The alphas of a panel's D2DMoE runs, in increasing order."""
    return sorted({r.setting["alpha"] for r in runs
                   if (r.setting["model"], r.setting["data"], r.setting["method"]) == (model, data, "d2dmoe")})


def headline_alpha(runs: list, model: str, data: str) -> dict:
    """The D2DMoE runs a panel headlines: those at the built-in default's alpha where the panel has
    them, else the first found (the other alphas go to `by_alpha`)."""
    default = default_alpha()
    return {"alpha": default} if any(math.isclose(a, default) for a in panel_alphas(runs, model, data)) else {}


def sparsify_epochs(runs: dict) -> int | None:
    """The sparsify epochs D2DMoE's runs trained (their .hydra/config.yaml; None where a run lacks it):
    the points record alpha, not this."""
    epochs = set()
    for run in runs.values():
        config = run.dir / ".hydra" / "config.yaml"
        if not config.exists():
            return None
        epochs.add(OmegaConf.load(config).sparsity.epochs)
    if len(epochs) > 1:
        sys.exit(f"fig_main: a panel's seeds trained sparsify for different epochs ({sorted(epochs)}): one per panel")
    return epochs.pop() if epochs else None


def mean_curve(runs: dict, rule: str, resamples: int) -> tuple[np.ndarray, dict]:
    """The mean over seeds of each seed's test frontier, on the costs every seed reaches, with its
    95% band over seeds and test examples (evidence.curve_band)."""
    band = curve_band([run.test_curve(rule) for run in runs.values()], COST_GRID, resamples)
    reached = np.isfinite(band["mean"])
    return COST_GRID[reached], {k: band[k][reached] for k in ("mean", "lo", "hi")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=list(SWEEPS), help="sweep directories (one per family)")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--name", default="fig_main", help="output file name (.png, .pdf, .json)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the test examples")
    args = parser.parse_args(argv)

    runs = load_runs(*args.results)
    panels = sorted({(r.setting["model"], r.setting["data"]) for r in runs}) or [("?", "?")]
    try:
        wanted = {(m, d): {"D2DMoE": {"model": m, "data": d, "method": "d2dmoe", "rule": "dynk",
                                      **headline_alpha(runs, m, d)},
                           "MoEfication": {"model": m, "data": d, "method": "moefication", "router": "moefication",
                                           "rule": "topk"}} for m, d in panels}
        chosen = {panel: select_seeds(runs, want, "fig_main", COMMAND) for panel, want in wanted.items()}
    except MissingRuns as err:
        sys.exit(str(err))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    summary = {}
    for ax, ((model, data), pair) in zip(axes[0], chosen.items()):
        d2d, moef = pair["D2DMoE"], pair["MoEfication"]
        first = next(iter(d2d.values()))
        metric, alpha = first.dense["metric"], first.setting["alpha"]  # the headline alpha (headline_alpha)
        alphas = panel_alphas(runs, model, data)
        seeds = sorted(set(d2d) & set(moef))
        d2d, moef = {s: d2d[s] for s in seeds}, {s: moef[s] for s in seeds}
        original = original_router(runs, model, data, d2d)  # {seed: run}, where the sweep ran it
        curves = [(f"D2DMoE (dynamic-k, tau), alpha {alpha:g}", d2d, "dynk", "o-"),
                  ("MoEfication (top-k, k)", moef, "topk", "s--")]
        if original:
            curves.append(("MoEfication, its original router (top-k, k)", original, "topk", "^:"))
        base = baselines(runs, model, data, d2d)  # {name: {seed: run}}, where the sweep ran them
        for (name, by_seed), style in zip(base.items(), ("d-.", "v-.")):
            curves.append((f"{name.upper()} (training-free, target sparsity)", by_seed, name, style))
        for label, by_seed, rule, style in curves:
            costs, band = mean_curve(by_seed, rule, max(args.resamples // 4, 100))
            line, = ax.plot(costs, band["mean"], style[1:], label=f"{label}, mean of {len(by_seed)} seeds")
            ax.fill_between(costs, band["lo"], band["hi"], color=line.get_color(), alpha=0.2, lw=0)
            for run in by_seed.values():
                curve = run.curve(rule)
                ax.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], style[0], ms=2.5,
                        color=line.get_color(), alpha=0.5)
        dense = t_interval([r.dense["value"] for r in d2d.values()])
        spread = curve_band([r.test_curve("dense") for r in d2d.values()], np.array([1.0]), args.resamples)
        ax.errorbar([1.0], spread["mean"], yerr=[spread["mean"] - spread["lo"], spread["hi"] - spread["mean"]],
                    fmt="k*", ms=12, label="dense (converged reference)")
        ax.set_xlabel(COST_LABEL)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{model} on {data}: seeds {', '.join(map(str, seeds))};\n95% bands "
                     "(seeds and test examples)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        used = [r.dir.resolve() for r in runs if (r.setting["model"], r.setting["data"]) == (model, data)]
        s = {"metric": metric, "split": "test", "seeds": seeds, "alpha": alpha,
             "sparsity_epochs": sparsify_epochs(d2d), "dense": dense,
             # what each seed's dense training did (stats.json): epochs run, the epoch kept, what stopped it
             "dense_training": {str(k): (r.stats or {}).get("dense_training") for k, r in d2d.items()},
             "sweeps": [d for d in args.results if any(Path(d).resolve() in u.parents for u in used)],
             "chosen": {"d2dmoe": {str(k): r.tuned for k, r in d2d.items()},
                        "moefication": {str(k): r.tuned for k, r in moef.items()}},
             # the settings each method's search covered, and the choices on its edge
             "searched": {name: search_grid(runs, wanted[(model, data)][label])
                          for name, label in (("d2dmoe", "D2DMoE"), ("moefication", "MoEfication"))},
             "cheapest_within": cheapest_by_seed(d2d, "dynk"),
             "d2dmoe_minus_moefication": margins(d2d, moef, args.resamples)}
        s["on_edge"] = {name: on_edge(s["searched"][name], by_seed) for name, by_seed in (("d2dmoe", d2d),
                                                                                         ("moefication", moef))}
        if original:  # the same comparison against MoEfication's own router, on the seeds it has
            s["chosen"]["moefication_original"] = {str(k): r.tuned for k, r in original.items()}
            s["d2dmoe_minus_moefication_original"] = margins({k: d2d[k] for k in original}, original, args.resamples)
        for name, by_seed in base.items():  # D2DMoE against each training-free baseline, on its seeds
            s[f"d2dmoe_minus_{name}"] = margins(d2d, by_seed, args.resamples, rule=name, name=name)
        if len(alphas) > 1:
            s["by_alpha"] = {}
            for a in alphas:
                if a == alpha:  # the headline, computed above
                    s["by_alpha"][f"{a:g}"] = s["d2dmoe_minus_moefication"]
                    continue
                want = {"model": model, "data": data, "method": "d2dmoe", "rule": "dynk", "alpha": a}
                by_seed = select_seeds(runs, {"D2DMoE": want}, "fig_main", COMMAND)["D2DMoE"]
                shared = sorted(set(by_seed) & set(moef))
                s["by_alpha"][f"{a:g}"] = margins({k: by_seed[k] for k in shared}, {k: moef[k] for k in shared},
                                                  args.resamples)
        summary[f"{model}/{data}"] = s
        report(f"{model}/{data}", s)
    fig.suptitle(f"D2DMoE vs MoEfication  ({TAU_NOTE})", fontsize=9, y=1.04)
    paths = save(fig, args.out, args.name)
    (paths[0].with_suffix(".json")).write_text(json.dumps(summary, indent=2))
    print("wrote", *paths, paths[0].with_suffix(".json"))
    return 0


def report(panel: str, s: dict) -> None:
    metric = s["metric"]
    c, m = s["cheapest_within"], s["d2dmoe_minus_moefication"]
    print(f"\n{panel} (test {metric}, seeds {s['seeds']}, 95% intervals)")
    print(f"  dense: {describe(s['dense'], 'value', metric)}")
    print(f"  lowest rel_cost within {c['tolerance']:g} of dense, chosen on validation: "
          f"{describe(c['rel_cost'], 'cost', metric)}; its test distance to dense: "
          f"{describe(c['minus_dense'], 'margin', metric)}")
    for cost, row in m["at"].items():
        print(f"  D2DMoE - MoEfication at rel_cost {cost}: {describe(row, 'margin', metric)}")
    if m["worst"]:
        print(f"  worst in the shared range {m['shared_range']}: {describe(m['worst'], 'margin', metric)} "
              f"at rel_cost {m['worst']['rel_cost']:.3f}")
    print(f"  MoEfication ahead with an interval excluding 0: {m['moefication_leads_excluding_0'] or 'nowhere'}")
    others = [("moefication_original", "MoEfication's original router"),
              *((name, f"{name.upper()} (training-free)") for name in THRESHOLD_RULES)]
    for key, who in others:
        if o := s.get(f"d2dmoe_minus_{key}"):
            parts = [f"at {cost} {describe(row, 'margin', metric)}" for cost, row in o["at"].items()]
            if o["worst"]:
                parts.append(f"worst {describe(o['worst'], 'margin', metric)} at {o['worst']['rel_cost']:.3f}")
            print(f"  against {who} (seeds {o['seeds']}): {'; '.join(parts) or 'no shared cost range'}")


if __name__ == "__main__":
    main()
