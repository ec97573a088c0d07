"""Choose a preset's settings on validation: for a sweep over some config keys (and seeds), the
setting whose lowest validation rel_cost within 1 point of dense is lowest, averaged over seeds.

    python run.py -m experiment=choose_sparsity && python experiments/choose_on_validation.py
    python experiments/choose_on_validation.py --results results/my_sweep --keys sparsity.alpha
    python experiments/choose_on_validation.py --results results/sweep results/sweep_rerun --name my_choice

Several directories are read as one sweep (jobs of a stopped sweep named again into another
directory, say).

Per job: its value of each key (from the job's .hydra/config.yaml; by default the keys the sweep
varied, besides `seed`), its seed, and D2DMoE's point of lowest validation rel_cost whose
validation metric is within the tolerance of its own dense reference's (results.cheapest_within).
A setting's score is that rel_cost averaged over its seeds (a seed with no such point counts as 1,
the dense cost); ties go to the better mean validation frontier (evidence.validation_score). Test
numbers play no part in the choice: they are printed, and written, for the chosen setting only.
Writes <out>/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from d2dmoe.evidence import validation_score
from d2dmoe.figures import MissingRuns, Run, cheapest_by_seed, load_runs


def swept_keys(sweep_dirs: list[Path]) -> list[str]:
    """The keys the Hydra multiruns varied (their multirun.yaml), besides the seed, in order."""
    keys = []
    for d in sweep_dirs:
        if (d / "multirun.yaml").exists():
            params = OmegaConf.load(d / "multirun.yaml").hydra.sweeper.params or {}
            keys += [k for k in params if k != "seed" and k not in keys]
    if not keys:
        sys.exit(f"no multirun.yaml naming swept keys under {', '.join(map(str, sweep_dirs))}: give --keys")
    return keys


def setting_of(run_dir: Path, keys: list[str]) -> tuple:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    return tuple(OmegaConf.select(cfg, k) for k in keys)


def choose(settings: dict[tuple, dict[int, Run]], rule: str) -> list[dict]:
    """settings: setting -> {seed: run}. One row per setting, best on validation first: its cheapest
    points (figures.cheapest_by_seed), score and tie-break."""
    runs = [r for by_seed in settings.values() for r in by_seed.values()]
    # the tie-break: each run's validation frontier, scored over the range all of them share
    frontier = dict(zip(map(id, runs), validation_score([r.validation(rule) for r in runs], runs[0].dense["metric"])))
    rows = []
    for setting, by_seed in settings.items():
        cheapest = cheapest_by_seed(by_seed, rule)
        costs = [p["val_rel_cost"] if p else 1.0 for p in cheapest["per_seed"].values()]
        rows.append({"setting": setting, "runs": by_seed, "seeds": sorted(by_seed), "val_rel_cost_per_seed": costs,
                     "val_rel_cost": float(np.mean(costs)),
                     "val_frontier": float(np.mean([frontier[id(r)] for r in by_seed.values()])),
                     "cheapest_within": cheapest})
    return sorted(rows, key=lambda r: (r["val_rel_cost"], -r["val_frontier"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=["results/choose_sparsity"],
                        help="sweep directories, read as one sweep")
    parser.add_argument("--keys", nargs="+", default=None, help="config keys to choose (default: those swept)")
    parser.add_argument("--rule", default="dynk", help="the selection rule whose points are chosen among")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--name", default=None, help="output name (default: the first sweep directory's name)")
    args = parser.parse_args(argv)

    sweeps = [Path(r) for r in args.results]
    sweep = ", ".join(map(str, sweeps))
    keys = args.keys or swept_keys(sweeps)
    settings: dict[tuple, dict[int, Run]] = {}
    for run in load_runs(*sweeps):
        if run.curve(args.rule):
            by_seed = settings.setdefault(setting_of(run.dir, keys), {})
            if run.seed in by_seed:  # the same job twice: which to keep is not for this script to guess
                sys.exit(f"{by_seed[run.seed].dir} and {run.dir} are the same setting and seed: remove one")
            by_seed[run.seed] = run
    if not settings:
        sys.exit(f"no runs with {args.rule} points under {sweep}")
    try:
        rows = choose(settings, args.rule)
    except MissingRuns as err:
        sys.exit(str(err))

    def named(setting: tuple) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(keys, setting))

    print(f"under {sweep}, by the lowest validation rel_cost within 1 point of dense, mean over seeds:")
    for r in rows:
        print(f"  {named(r['setting'])}: {r['val_rel_cost']:.3f} (seeds {r['seeds']}: "
              f"{', '.join(f'{c:.3f}' for c in r['val_rel_cost_per_seed'])}; "
              f"mean validation frontier {r['val_frontier']:.4f})")
    best = rows[0]
    test = best["cheapest_within"]  # test numbers: reported for the chosen setting only
    print(f"chosen on validation: {named(best['setting'])}; at its chosen points, test rel_cost "
          + (f"{test['rel_cost']['mean']:.3f} and test distance to dense {test['minus_dense']['mean']:+.4f}, "
             f"mean of {test['rel_cost']['n']} seed(s)" if test["rel_cost"]["n"] else "none within"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or sweeps[0].name
    path = out / f"{name}.json"
    command = " ".join(["python experiments/choose_on_validation.py --results", *map(str, sweeps), "--name", name])
    path.write_text(json.dumps({
        "results": [str(s) for s in sweeps], "command": command, "keys": keys, "rule": args.rule, "chosen_on": "validation",
        "metric": next(iter(best["runs"].values())).dense["metric"],
        "chosen": dict(zip(keys, best["setting"])),
        "settings": [{**dict(zip(keys, r["setting"])),
                      **{k: r[k] for k in ("seeds", "val_rel_cost_per_seed", "val_rel_cost", "val_frontier")}}
                     for r in rows],
        "chosen_test": best["cheapest_within"]}, indent=2))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
