"""What the figure scripts in experiments/ share: reading local result directories (each job's
points.jsonl and stats.json), picking the runs a figure needs (or naming the missing ones),
comparing accuracy-cost curves, and saving PNG + PDF."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .cli import CONF
from .results import read_points, read_stats
from .tasks import sign

COST_LABEL = "relative cost (MACs per sample / dense MACs)"
TAU_NOTE = "dynamic-k: expert e runs iff $r_e \\geq \\tau \\max_j r_j$"
SETTING_KEYS = ("model", "data", "method", "router", "alpha", "activation", "num_experts", "expert_size",
                "attention")


def default_alpha() -> float:
    """The built-in default's sparsity penalty weight (conf/sparsity/hoyer.yaml): the run the
    figures show as "sparsified" or "D2DMoE" unless told otherwise."""
    return float(OmegaConf.load(CONF / "sparsity" / "hoyer.yaml").alpha)


class MissingRuns(Exception):
    """A figure's inputs are incomplete; the message names the missing runs and how to make them."""


@dataclass
class Run:
    dir: Path
    points: list[dict]
    stats: dict | None

    @property
    def dense(self) -> dict:
        return next(p for p in self.points if p["method"] == "dense")

    def curve(self, rule: str | None = None) -> list[dict]:
        """The converted points (of one selection rule, or all), cheapest first."""
        return sorted((p for p in self.points if p["method"] != "dense" and rule in (None, p["rule"])),
                      key=lambda p: p["rel_cost"])

    @property
    def setting(self) -> dict:
        """What distinguishes this run from others of a sweep: method, router, alpha, ..., and
        `rules`, the selection rules it evaluated."""
        curve = self.curve()
        return {**{k: curve[0].get(k) for k in SETTING_KEYS}, "rules": sorted({p["rule"] for p in curve})}


def load_runs(*dirs: str | Path) -> list[Run]:
    """Every run under the given directories: a directory holding points.jsonl, or its children."""
    runs = []
    for d in map(Path, dirs):
        for points in sorted([d / "points.jsonl"] if (d / "points.jsonl").exists() else d.glob("*/points.jsonl")):
            has_stats = points.with_name("stats.json").exists()
            runs.append(Run(points.parent, read_points(points), read_stats(points.parent) if has_stats else None))
    return runs


def matches(setting: dict, want: dict) -> bool:
    for key, value in want.items():
        if key == "rule":  # a run that evaluated both rules serves either
            if value not in setting["rules"]:
                return False
            continue
        have = setting.get(key)
        if isinstance(value, float) and isinstance(have, (int, float)):
            if not math.isclose(have, value, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != value:
            return False
    return True


def select(runs: list[Run], wanted: dict[str, dict], figure: str, command: str, stats: bool = False) -> dict[str, Run]:
    """label -> the run whose setting matches wanted[label] (and has stats.json when `stats`).
    Raises MissingRuns naming every label without a run."""
    found, missing = {}, []
    for label, want in wanted.items():
        run = next((r for r in runs if matches(r.setting, want) and (r.stats or not stats)), None)
        if run is None:
            missing.append(f"{label} ({', '.join(f'{k}={v}' for k, v in want.items())})")
        else:
            found[label] = run
    if missing:
        where = sorted({str(r.dir.parent) for r in runs}) or ["no runs found"]
        raise MissingRuns(f"{figure}: missing runs: {'; '.join(missing)}. Looked in: {', '.join(where)}. "
                          f"Make them with: {command}")
    return found


def frontier(points: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto frontier (best metric at each cost or less), as (rel_cost, value) arrays."""
    s = sign(metric)  # compare as "higher is better"
    costs, values = [], []
    for p in sorted(points, key=lambda p: p["rel_cost"]):
        if not values or s * p["value"] > s * values[-1]:
            costs.append(p["rel_cost"])
            values.append(p["value"])
    return np.array(costs), np.array(values)


def value_at(points: list[dict], metric: str, cost: float) -> float:
    """The frontier's metric at `cost`, linearly interpolated; NaN outside the curve's range."""
    c, v = frontier(points, metric)
    if len(c) == 0 or cost < c[0] or cost > max(p["rel_cost"] for p in points):
        return float("nan")
    return float(np.interp(cost, c, v))


def metric_label(metric: str) -> str:
    return {"accuracy": "test accuracy", "loss": "test loss (lower is better)"}.get(metric, metric)


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
