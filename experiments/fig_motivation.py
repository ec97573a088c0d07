"""Figure motivation, three panels on one model:
(a) activation sparsity (fraction of zero FFN activations, mean over layers and tokens) against alpha;
(b) how many activations each token keeps: the distribution over tokens (all layers) of the
    fraction of non-zero activations, ReLU swap only (alpha 0) against the most sparsified run;
(c) dynamic-k against top-k on the same routers (the default alpha).

    python run.py -m experiment=fig_motivation && python experiments/fig_motivation.py
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from d2dmoe.figures import COST_LABEL, TAU_NOTE, MissingRuns, load_runs, metric_label, pyplot, save, select
from d2dmoe.figures import default_alpha

COMMAND = "python run.py -m experiment=fig_motivation"
ALPHAS = (0.0, 0.003, 0.01, 0.03)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=["results/fig_motivation"])
    parser.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    parser.add_argument("--alpha", type=float, default=default_alpha(),
                        help="the run whose rules panel (c) compares (default: the built-in default's)")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)

    wanted = {f"alpha={a:g}": {"alpha": a, "rule": "dynk"} for a in args.alphas}
    wanted[f"alpha={args.alpha:g} top-k"] = {"alpha": args.alpha, "rule": "topk"}
    wanted[f"alpha={args.alpha:g}"] = {"alpha": args.alpha, "rule": "dynk"}
    try:
        runs = select(load_runs(*args.results), wanted, "fig_motivation", COMMAND, stats=True)
    except MissingRuns as err:
        sys.exit(str(err))

    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    # (a) sparsity vs alpha; alpha 0 sits at the left of a symlog axis
    alphas = sorted(args.alphas)
    zero = [np.mean([layer["zero_fraction"] for layer in runs[f"alpha={x:g}"].stats["activation"]]) for x in alphas]
    spread = [np.mean([layer["zero_fraction_std"] for layer in runs[f"alpha={x:g}"].stats["activation"]])
              for x in alphas]
    a.errorbar(alphas, zero, yerr=spread, fmt="o-", capsize=3)
    a.set_xscale("symlog", linthresh=min([x for x in alphas if x > 0], default=1e-3))
    a.set_xlabel("sparsity penalty alpha (square Hoyer)")
    a.set_ylabel("fraction of zero FFN activations\n(mean over layers; bars: std over tokens)")
    a.set_title("(a) activation sparsity", fontsize=9)
    a.grid(alpha=0.3)

    # (b) per-token non-zero fraction, summed over layers
    for x in (alphas[0], alphas[-1]):
        hists = np.array([layer["nonzero_fraction_hist"] for layer in runs[f"alpha={x:g}"].stats["activation"]])
        hist = hists.sum(0) / hists.sum()
        edges = np.linspace(0, 1, len(hist) + 1)
        b.stairs(hist, edges, label=f"alpha={x:g}", fill=False)
    b.set_xlabel("fraction of non-zero activations in a token's FFN")
    b.set_ylabel("fraction of tokens (all layers)")
    b.set_title("(b) non-zero activations per token", fontsize=9)
    b.legend(fontsize=7)
    b.grid(alpha=0.3)

    # (c) the two selection rules on the same routers
    dynk = runs[f"alpha={args.alpha:g}"]  # the run evaluated both rules: routing=both
    for label, rule, style in (("dynamic-k (tau)", "dynk", "o-"), ("top-k (k)", "topk", "s--")):
        curve = dynk.curve(rule)
        c.plot([p["rel_cost"] for p in curve], [p["value"] for p in curve], style, ms=4, label=label)
    c.plot([1.0], [dynk.dense["value"]], "k*", ms=12, label="dense")
    c.set_xlabel(COST_LABEL)
    c.set_ylabel(metric_label(dynk.dense["metric"]))
    c.set_title(f"(c) dynamic-k vs top-k, same routers (alpha={args.alpha:g})", fontsize=9)
    c.legend(fontsize=7)
    c.grid(alpha=0.3)
    s = dynk.setting
    fig.suptitle(f"{s['model']} on {s['data']}   ({TAU_NOTE})", fontsize=9)
    print("wrote", *save(fig, args.out, "fig_motivation"))
    return 0


if __name__ == "__main__":
    main()
