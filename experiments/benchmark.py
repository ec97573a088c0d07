"""Benchmark: wall time of `python run.py [overrides]` from scratch, the dense metric, and the lowest
rel_cost that keeps the dense quality on validation: accuracy within 1 point of dense, or (language
models) loss within 2% of dense, chosen on the validation split and reported on test (best_*; its
validation numbers as best_val_*). Prints a summary and writes it as JSON.

    python experiments/benchmark.py                          # the built-in default
    python experiments/benchmark.py experiment=minilm_carer
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from d2dmoe.results import TOLERANCE, cheapest_within, read_points

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to run.py")
    parser.add_argument("--out", default="benchmark", help="folder for the run and the summary JSON")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="accuracy drop allowed (default 0.01) or relative loss increase (default 0.02)")
    parser.add_argument("--artifacts", default=None,
                        help="artifacts folder to use (and reuse); default: a fresh temporary one, a cold run")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = "-".join(o.split("=")[-1] for o in args.overrides) or "default"
    run_dir = out / name
    with tempfile.TemporaryDirectory(prefix="d2dmoe-bench-") as tmp:
        artifacts = args.artifacts or tmp
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "run.py"), *args.overrides, f"artifacts_dir={artifacts}",
                        f"hydra.run.dir={run_dir}"], cwd=ROOT, check=True)
        wall = time.perf_counter() - start

    points = read_points(run_dir / "points.jsonl")
    dense = next(p for p in points if p["method"] == "dense")
    best = cheapest_within(points, args.tolerance)
    tolerance = TOLERANCE[dense["metric"]] if args.tolerance is None else args.tolerance
    summary = {"overrides": args.overrides, "wall_s": round(wall, 1), "threads": os.cpu_count(),
               "metric": dense["metric"], "dense_value": dense["value"], "tolerance": tolerance,
               "best_rel_cost": best["rel_cost"] if best else None,
               "best_value": best["value"] if best else None,
               "best_tau": best["tau"] if best else None, "best_k": best["k"] if best else None,
               "chosen_on": "validation", "dense_val_value": dense["val_value"],
               "best_val_rel_cost": best["val_rel_cost"] if best else None,
               "best_val_value": best["val_value"] if best else None,
               "best_experts_per_token": best["experts_per_token"] if best else None,
               # whether the splits had their repeats removed (d2dmoe.dedup): the README says so of rows without
               "dedup": bool(OmegaConf.load(run_dir / ".hydra" / "config.yaml").data.get("dedup", False))}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
