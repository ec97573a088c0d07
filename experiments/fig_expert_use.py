"""Figure expert use: in each MoE layer, the distribution over test tokens of how many experts a
token executed at one tau, for the ReLU swap alone (alpha 0) against the sparsified model; the
legend gives the mean and the accuracy at that tau.

    python run.py -m experiment=fig_expert_use && python experiments/fig_expert_use.py --tau 0.3
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from d2dmoe.figures import TAU_NOTE, MissingRuns, default_alpha, load_runs, pyplot, save, select

COMMAND = "python run.py -m experiment=fig_expert_use"


def at_tau(run, tau: float) -> tuple[dict, dict]:
    """The run's stats entry and point at `tau`; exits naming the taus it has when missing."""
    close = lambda x: x is not None and math.isclose(x, tau)  # noqa: E731
    q = next((q for q in run.stats["points"] if close(q["tau"])), None)
    p = next((p for p in run.curve("dynk") if close(p["tau"])), None)
    if q is None or p is None:
        sys.exit(f"fig_expert_use: {run.dir} has no tau={tau}; it has {[q['tau'] for q in run.stats['points']]}")
    return q, p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=["results/fig_expert_use"])
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--alphas", type=float, nargs=2, default=[0.0, default_alpha()],
                        metavar=("RELU_ONLY", "SPARSIFIED"))
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)

    wanted = {f"alpha={a:g}": {"alpha": a, "rule": "dynk"} for a in args.alphas}
    try:
        runs = select(load_runs(*args.results), wanted, "fig_expert_use", COMMAND, stats=True)
    except MissingRuns as err:
        sys.exit(str(err))

    entries = {label: at_tau(run, args.tau) for label, run in runs.items()}
    layers = len(next(iter(entries.values()))[0]["layers"])
    plt = pyplot()
    cols = min(layers, 4)
    rows = math.ceil(layers / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= layers:
            ax.axis("off")
            continue
        for (label, (q, p)), name in zip(entries.items(), ("ReLU only", "sparsified")):
            hist = np.array(q["layers"][layer]["experts_hist"], dtype=float)
            hist /= hist.sum()
            mean = q["layers"][layer]["experts_per_token"]
            ax.stairs(hist, np.arange(len(hist) + 1) - 0.5, label=f"{name} ({label}): mean {mean:.1f}")
        ax.set_xscale("symlog", linthresh=4)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("experts executed per token")
        ax.set_ylabel("fraction of tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    s = next(iter(runs.values())).setting
    accs = ", ".join(f"{label}: {p['metric']} {p['value']:.4f}, rel_cost {p['rel_cost']:.3f}"
                     for label, (q, p) in entries.items())
    fig.suptitle(f"{s['model']} on {s['data']}, {s['num_experts']} experts, tau={args.tau:g} ({TAU_NOTE})\n{accs}",
                 fontsize=9)
    fig.tight_layout()
    print("wrote", *save(fig, args.out, "fig_expert_use"))
    return 0


if __name__ == "__main__":
    main()
