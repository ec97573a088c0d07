"""Figure main: test metric against relative cost, D2DMoE (dynamic-k) against MoEfication (top-k),
one panel per model and dataset. Also reports D2DMoE's margin over MoEfication along their shared
cost range (Pareto frontiers, linearly interpolated) and at rel_cost 0.5 and 0.75.

    python run.py -m experiment=fig_main && python experiments/fig_main.py
    python run.py -m experiment=fig_main_vit     # adds the ViT panel (fig_main_gpt2: GPT-2; fig_main_carer: CARER)
    python experiments/fig_main.py --results results/fig_main results/other_family --out figures

The fig_main sweeps run D2DMoE at two alphas: the experiment's and 0 (`ablation=no_sparsity`). With
D2DMoE runs at several alphas for a panel (more with e.g. --results results/fig_main
results/fig_motivation, the motivation sweep's alphas), each alpha gets its own curve, their envelope
(D2DMoE with the best alpha at each cost) is drawn as a line, and the summary adds each alpha's margin
(`by_alpha`) and the envelope's (`alpha_envelope`). The first D2DMoE run found (job 0 of a fig_main
sweep: the experiment's alpha) stays the headline comparison (`min_margin`, `margin_at`).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from d2dmoe.tasks import sign
from d2dmoe.figures import (COST_LABEL, TAU_NOTE, MissingRuns, frontier, load_runs, matches, metric_label, pyplot, save,
                            select, value_at)

COMMAND = "python run.py -m experiment=fig_main"
SWEEPS = ("results/fig_main", "results/fig_main_carer", "results/fig_main_vit", "results/fig_main_gpt2")  # a panel each
CHECK_AT = (0.5, 0.75)


def compare(d2dmoe: list[dict], moefication: list[dict], metric: str, grid: int = 200) -> dict:
    """D2DMoE minus MoEfication (for loss: MoEfication minus D2DMoE, so positive = D2DMoE better)
    on `grid` costs across the shared range, and at CHECK_AT."""
    lo = max(min(p["rel_cost"] for p in d2dmoe), min(p["rel_cost"] for p in moefication))
    hi = min(max(p["rel_cost"] for p in d2dmoe), max(p["rel_cost"] for p in moefication))
    margin = lambda c: sign(metric) * (value_at(d2dmoe, metric, c) - value_at(moefication, metric, c))  # noqa: E731
    costs = np.linspace(lo, hi, grid) if hi > lo else np.array([])
    margins = np.array([margin(c) for c in costs])
    return {"shared_range": [lo, hi] if hi > lo else None,
            "min_margin": float(margins.min()) if len(margins) else None,
            "min_margin_at": float(costs[margins.argmin()]) if len(margins) else None,
            "margin_at": {str(c): (margin(c) if lo <= c <= hi else None) for c in CHECK_AT}}


def d2dmoe_by_alpha(runs: list, model: str, data: str) -> dict:
    """alpha -> the first D2DMoE (dynamic-k) run of the panel with that alpha."""
    found = {}
    for run in runs:
        if matches(run.setting, {"model": model, "data": data, "method": "d2dmoe", "rule": "dynk"}):
            found.setdefault(run.setting["alpha"], run)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=list(SWEEPS), help="sweep directories (one per family)")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--name", default="fig_main", help="output file name (.png, .pdf, .json)")
    args = parser.parse_args(argv)

    runs = load_runs(*args.results)
    panels = sorted({(r.setting["model"], r.setting["data"]) for r in runs}) or [("?", "?")]
    try:
        chosen = {(m, d): select(runs, {"D2DMoE": {"model": m, "data": d, "method": "d2dmoe", "rule": "dynk"},
                                        "MoEfication": {"model": m, "data": d, "method": "moefication", "rule": "topk"}},
                                 "fig_main", COMMAND)
                  for m, d in panels}
    except MissingRuns as err:
        sys.exit(str(err))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    summary = {}
    for ax, (key, pair) in zip(axes[0], chosen.items()):
        d2d, moef = pair["D2DMoE"], pair["MoEfication"]
        metric = d2d.dense["metric"]
        others = {a: r for a, r in d2dmoe_by_alpha(runs, *key).items() if r is not d2d}
        every = {d2d.setting["alpha"]: d2d, **others}
        envelope = [p for r in every.values() for p in r.curve("dynk")]  # every alpha's points: their frontier
        alpha_note = f", alpha {d2d.setting['alpha']:g}" if others else ""
        for label, curve, style in ((f"D2DMoE (dynamic-k, tau){alpha_note}", d2d.curve("dynk"), "o-"),
                                    ("MoEfication (top-k, k)", moef.curve("topk"), "s--")):
            ax.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], style, ms=4, label=label)
        for alpha, run in sorted(others.items()):
            curve = run.curve("dynk")
            ax.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], ".:", lw=1,
                    label=f"D2DMoE, alpha {alpha:g}")
        if others:  # the envelope's Pareto frontier, joined linearly as the margins interpolate it
            costs, values = frontier(envelope, metric)
            ax.plot(costs, values, "-", color="0.3", lw=2.5, alpha=0.35, zorder=0,
                    label="D2DMoE, best alpha at each cost")
        ax.plot([1.0], [d2d.dense["value"]], "k*", ms=12, label="dense")
        ax.set_xlabel(COST_LABEL)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{key[0]} on {key[1]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        summary[f"{key[0]}/{key[1]}"] = {"metric": metric, "dense": d2d.dense["value"],
                                        **compare(d2d.curve("dynk"), moef.curve("topk"), metric)}
        if others:
            baseline = moef.curve("topk")
            summary[f"{key[0]}/{key[1]}"] |= {
                "by_alpha": {f"{a:g}": compare(r.curve("dynk"), baseline, metric) for a, r in sorted(every.items())},
                "alpha_envelope": compare(envelope, baseline, metric)}
    fig.suptitle(f"D2DMoE vs MoEfication  ({TAU_NOTE})", fontsize=9)
    paths = save(fig, args.out, args.name)
    (paths[0].with_suffix(".json")).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    main()
