"""One run's accuracy-cost curve for the README: every converted point of one run (one preset, one
seed) on the test split beside its validation numbers, the dense reference, the bar (1 point of
accuracy, or 2% of loss) and the cheapest point within it, chosen on validation
(results.cheapest_within). Writes figures/<name>.png, .pdf and .json; render_readme.py shows every
figures/curve_*.json.

    python run.py experiment=gemma3_bbc hydra.run.dir=results/gemma3_bbc
    python experiments/fig_curve.py results/gemma3_bbc --name curve_gemma3_bbc
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from d2dmoe.figures import COST_LABEL, TAU_NOTE, pyplot, save
from d2dmoe.results import TOLERANCE, cheapest_within, label, read_points
from d2dmoe.tasks import higher_is_better, threshold

POINT_KEYS = ("rule", "tau", "k", "rel_cost", "value", "val_rel_cost", "val_value", "experts_per_token",
              "agreement", "val_agreement", "kl_from_dense", "val_kl_from_dense")


def run_command(run_dir: Path) -> str:
    """The run.py command that made run_dir, from the overrides Hydra saved with it."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    given = yaml.safe_load(overrides.read_text()) if overrides.exists() else []
    return " ".join(["python run.py", *given, f"hydra.run.dir={run_dir.as_posix()}"])


def record(run_dir: Path, name: str) -> dict:
    points = read_points(run_dir / "points.jsonl")
    dense = next(p for p in points if p["method"] == "dense")
    metric = dense["metric"]
    curve = sorted((p for p in points if p["method"] != "dense"), key=lambda p: (p["rule"], -p["rel_cost"]))
    if not curve:
        sys.exit(f"fig_curve: {run_dir} has no converted points")
    best = cheapest_within(points)  # on validation; None when no point keeps the dense quality there
    keep = lambda p: {k: p[k] for k in POINT_KEYS if k in p}  # noqa: E731
    return {"run": run_dir.as_posix(), "command": run_command(run_dir),
            "made_by": f"python experiments/fig_curve.py {run_dir.as_posix()} --name {name}",
            "model": dense["model"], "data": dense["data"], "method": curve[0]["method"],
            "alpha": curve[0].get("alpha"), "num_experts": curve[0].get("num_experts"), "seed": dense.get("seed"),
            "metric": metric, "tolerance": TOLERANCE[metric], "split": "test", "chosen_on": "validation",
            "dense": {"value": dense["value"], "val_value": dense["val_value"], "macs": dense["macs"]},
            "points": [keep(p) for p in curve], "cheapest": keep(best) if best else None}


def plot(rec: dict):
    plt = pyplot()
    metric, dense = rec["metric"], rec["dense"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for rule in sorted({p["rule"] for p in rec["points"]}):
        pts = [p for p in rec["points"] if p["rule"] == rule]
        line, = ax.plot([p["rel_cost"] for p in pts], [p["value"] for p in pts], "o-", ms=4, label=f"{rule}, test")
        ax.plot([p["val_rel_cost"] for p in pts], [p["val_value"] for p in pts], "s--", ms=3, lw=1, alpha=0.6,
                color=line.get_color(), label=f"{rule}, validation")
        for p in pts:
            ax.annotate(label(p), (p["rel_cost"], p["value"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.plot([1.0], [dense["value"]], "k*", ms=12, label="dense, test")
    ax.plot([1.0], [dense["val_value"]], "*", ms=12, mfc="none", mec="k", label="dense, validation")
    worst = threshold(metric, dense["value"], rec["tolerance"])
    ax.axhline(worst, color="gray", ls=":", lw=1, label="the bar (test)")
    if rec["cheapest"]:
        c = rec["cheapest"]
        ax.plot([c["rel_cost"]], [c["value"]], "o", ms=11, mfc="none", mec="red",
                label="cheapest within the bar on validation")
    if not higher_is_better(metric):  # a broken conversion can lose by orders of magnitude
        ax.set_ylim(top=max(worst, *(p["value"] for p in rec["points"] if p["value"] < 3 * dense["value"])) * 1.05)
    ax.set_xlabel(COST_LABEL)
    ax.set_ylabel(metric if higher_is_better(metric) else f"{metric} (lower is better)")
    ax.set_title(f"{rec['model']} on {rec['data']}, seed {rec['seed']}  ({TAU_NOTE})", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's output directory (holding points.jsonl)")
    parser.add_argument("--name", default=None, help="default: curve_<the run directory's name>")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)
    if not (args.run / "points.jsonl").exists():
        sys.exit(f"fig_curve: {args.run} has no points.jsonl (has the run finished?)")

    name = args.name or f"curve_{args.run.name}"
    rec = record(args.run, name)
    paths = save(plot(rec), args.out, name)
    json_path = Path(args.out) / f"{name}.json"
    json_path.write_text(json.dumps(rec, indent=2))
    print("wrote", *paths, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
