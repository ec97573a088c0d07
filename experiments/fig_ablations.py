"""Ablation figures: the converted model's accuracy-cost curve under one changed factor.

    python experiments/fig_ablations.py phases       # MoEfication -> + sparsity -> + regression routers -> + dynamic-k
    python experiments/fig_ablations.py alpha        # base sparsity
    python experiments/fig_ablations.py expert_size  # neurons per expert
    python experiments/fig_ablations.py activation   # ReLU swap vs the model's own GELU
    python experiments/fig_ablations.py attention    # FFNs only vs FFNs and attention projections

Each reads results/fig_ablation_<name> (make it with `python run.py -m experiment=fig_ablation_<name>`)
and writes figures/fig_ablation_<name>.png and .pdf.
"""
from __future__ import annotations

import argparse
import sys

from d2dmoe.figures import (
    COST_LABEL,
    TAU_NOTE,
    MissingRuns,
    default_alpha,
    load_runs,
    metric_label,
    pyplot,
    save,
    select,
)
from d2dmoe.results import TOLERANCE, cheapest_within
from d2dmoe.results import label as label_of

DEFAULT_ALPHA = default_alpha()  # the phases' D2DMoE: the built-in default's alpha
ABLATIONS = {
    "phases": ("phase by phase", {
        "MoEfication (alpha 0, BCE router, top-k)": {"alpha": 0.0, "router": "moefication", "rule": "topk"},
        "+ sparsity penalty": {"alpha": DEFAULT_ALPHA, "router": "moefication", "rule": "topk"},
        "+ regression router": {"alpha": DEFAULT_ALPHA, "router": "regression", "rule": "topk"},
        "+ dynamic-k = D2DMoE": {"alpha": DEFAULT_ALPHA, "router": "regression", "rule": "dynk"},
    }),
    "alpha": ("base sparsity (square Hoyer penalty alpha)", {
        f"alpha={a:g}": {"alpha": a, "rule": "dynk"} for a in (0.0, 0.003, 0.01, 0.03)}),
    "expert_size": ("expert size (neurons per expert)", {
        f"{e} experts": {"num_experts": e, "rule": "dynk"} for e in (32, 64, 128, 256)}),
    "activation": ("ReLU swap vs keeping the model's activation", {
        "ReLU swap (D2DMoE)": {"activation": "relu", "rule": "dynk"},
        "activation kept (GELU)": {"activation": "keep", "rule": "dynk"}}),
    "attention": ("attention projections as MoE layers too", {
        "FFNs only": {"attention": False, "rule": "dynk"},
        "FFNs + attention projections": {"attention": True, "rule": "dynk"}}),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", choices=sorted(ABLATIONS))
    parser.add_argument("--results", nargs="+", default=None, help="default: results/fig_ablation_<ablation>")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)

    name = f"fig_ablation_{args.ablation}"
    title, wanted = ABLATIONS[args.ablation]
    try:
        runs = select(load_runs(*(args.results or [f"results/{name}"])), wanted, name,
                      f"python run.py -m experiment={name}")
    except MissingRuns as err:
        sys.exit(str(err))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, run in runs.items():
        curve = run.curve(wanted[label]["rule"])
        best = cheapest_within([run.dense, *curve])
        print(f"{label}: lowest rel_cost within {TOLERANCE[run.dense['metric']]:g} of dense: "
              + (f"{best['rel_cost']:.3f} ({label_of(best)}, {best['value']:.4f})" if best else "none"))
        if args.ablation == "expert_size":
            label += f" of {run.setting['expert_size']}"
        ax.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], "o-", ms=3, label=label)
    first = next(iter(runs.values()))
    ax.plot([1.0], [first.dense["value"]], "k*", ms=12, label="dense")
    ax.set_xlabel(COST_LABEL)
    ax.set_ylabel(metric_label(first.dense["metric"]))
    s = first.setting
    ax.set_title(f"Ablation: {title}\n{s['model']} on {s['data']}  ({TAU_NOTE})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    print("wrote", *save(fig, args.out, name))
    return 0


if __name__ == "__main__":
    main()
