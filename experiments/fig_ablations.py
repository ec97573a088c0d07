"""Ablation figures: the converted model's accuracy-cost curve under one changed factor.

    python experiments/fig_ablations.py phases       # MoEfication -> + sparsity -> + regression routers -> + dynamic-k
    python experiments/fig_ablations.py alpha        # base sparsity
    python experiments/fig_ablations.py expert_size  # neurons per expert
    python experiments/fig_ablations.py activation   # ReLU swap vs the model's own GELU
    python experiments/fig_ablations.py attention    # FFNs only vs FFNs and attention projections

Each reads results/fig_ablation_<name> (make it with `python run.py -m experiment=fig_ablation_<name>`;
add seed=0,1,2 for intervals) and writes figures/fig_ablation_<name>.png, .pdf and .json. Per arm and
seed, a router setting the sweep searched is chosen on validation (figures.choose_by_seed), and so is
each arm's cheapest point within 1 point of dense (results.cheapest_within). Each arm is compared
with the previous one on test, paired by seed and test example: the margin at rel_cost 0.5 and 0.75
and at its worst cost of their shared range, with 95% intervals over seeds and test examples (evidence.paired_margins).
"""
from __future__ import annotations

import argparse
import json
import sys

from d2dmoe.figures import (
    COST_LABEL,
    TAU_NOTE,
    MissingRuns,
    cheapest_by_seed,
    compare,
    default_alpha,
    load_runs,
    metric_label,
    pyplot,
    save,
    select_seeds,
)

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
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the test examples")
    args = parser.parse_args(argv)

    name = f"fig_ablation_{args.ablation}"
    title, wanted = ABLATIONS[args.ablation]
    try:
        arms = select_seeds(load_runs(*(args.results or [f"results/{name}"])), wanted, name,
                            f"python run.py -m experiment={name}")
    except MissingRuns as err:
        sys.exit(str(err))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    summary, previous = {}, None
    for label, by_seed in arms.items():
        rule = wanted[label]["rule"]
        cheapest = cheapest_by_seed(by_seed, rule)
        costs = cheapest["rel_cost"]
        first = next(iter(by_seed.values()))
        value = cheapest["value"]
        print(f"{label}: lowest rel_cost within {cheapest['tolerance']:g} of dense, chosen on validation "
              f"({len(by_seed)} seed(s), test): "
              + (f"{costs['mean']:.3f} at {value['mean']:.4f}" if costs["n"] else "none"))
        arm = {"seeds": sorted(by_seed), "metric": first.dense["metric"], "cheapest_within": cheapest}
        if previous is not None:
            prev_label, prev_runs, prev_rule = previous
            seeds = sorted(set(by_seed) & set(prev_runs))
            arm["minus_previous"] = {"previous": prev_label, "seeds": seeds, **compare(
                [(by_seed[s], rule, prev_runs[s], prev_rule) for s in seeds], args.resamples)}
            at = arm["minus_previous"]["at"]
            print("  minus " + prev_label + ": " + "; ".join(
                f"at {c}: " + (f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]" if r and r["lo"] is not None
                               else "n/a") for c, r in at.items()))
        summary[label] = arm
        previous = (label, by_seed, rule)
        if args.ablation == "expert_size":
            label += f" of {first.setting['expert_size']}"
        color = None  # the first seed's line takes the next colour, the others the same
        for i, run in enumerate(by_seed.values()):
            curve = run.curve(rule)
            line, = ax.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], "o-", ms=3,
                            label=label if i == 0 else None, color=color)
            color = line.get_color()
    first = next(iter(next(iter(arms.values())).values()))
    ax.plot([1.0], [first.dense["value"]], "k*", ms=12, label="dense")
    ax.set_xlabel(COST_LABEL)
    ax.set_ylabel(metric_label(first.dense["metric"]))
    s = first.setting
    ax.set_title(f"Ablation: {title}\n{s['model']} on {s['data']}  ({TAU_NOTE})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths = save(fig, args.out, name)
    paths[0].with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print("wrote", *paths, paths[0].with_suffix(".json"))
    return 0


if __name__ == "__main__":
    main()
