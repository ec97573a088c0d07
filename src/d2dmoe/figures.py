"""What the figure scripts in experiments/ share: reading local result directories (each job's
points.jsonl, examples.npz and stats.json), picking the runs a figure needs (or naming the missing
ones) with the tuned settings chosen on validation, seed by seed, comparing accuracy-cost curves,
and saving PNG + PDF."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .conf import CONF
from .evidence import (
    Curve,
    paired_margins,
    pareto,
    summarise,
    t_interval,
    validation_score,
)
from .results import TOLERANCE, cheapest_within, read_examples, read_points, read_stats

COST_LABEL = "relative cost (MACs per sample / dense MACs)"
TAU_NOTE = "dynamic-k: expert e runs iff $r_e \\geq \\tau \\max_j r_j$"
SETTING_KEYS = ("model", "data", "method", "router", "alpha", "activation", "num_experts", "expert_size",
                "attention")
# settings a sweep searches per method and seed; a figure takes, per seed, the value best on validation
TUNED_KEYS = ("router_lr", "router_epochs", "sparsity_epochs")
CHECK_AT = (0.5, 0.75)  # the rel_costs every comparison of two curves reports
COST_GRID = np.union1d(np.linspace(0.0, 1.2, 241), CHECK_AT)  # the costs comparisons are computed at


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
        `rules`, the selection rules it evaluated (not the seed, nor the TUNED_KEYS)."""
        curve = self.curve()
        return {**{k: curve[0].get(k) for k in SETTING_KEYS}, "rules": sorted({p["rule"] for p in curve})}

    @property
    def seed(self) -> int:
        return int(self.points[0].get("seed", 0))

    @property
    def tuned(self) -> dict:
        """The TUNED_KEYS' values; sparsity_epochs from the job's .hydra/config.yaml for points made
        before they recorded it."""
        tuned = {k: self.points[0].get(k) for k in TUNED_KEYS}
        config = self.dir / ".hydra" / "config.yaml"
        if tuned["sparsity_epochs"] is None and config.exists():
            tuned["sparsity_epochs"] = int(OmegaConf.load(config).sparsity.epochs)
        return tuned

    def rows(self, rule: str) -> list[int]:
        """Indices (into points.jsonl and examples.npz) of the rule's points, cheapest first."""
        ids = [i for i, p in enumerate(self.points) if p["rule"] == rule]
        return sorted(ids, key=lambda i: self.points[i]["rel_cost"])

    @functools.cached_property
    def examples(self) -> dict:
        """{split: {key: [points, N]}} from examples.npz, read once."""
        if not (self.dir / "examples.npz").exists():
            raise MissingRuns(f"{self.dir} has no examples.npz (made before per-example results were saved): "
                              "run it again for confidence intervals")
        return read_examples(self.dir)

    def test_curve(self, rule: str) -> Curve:
        """The rule's points on the test split, per example (evidence.Curve)."""
        return Curve.of(self.points, self.examples["test"], self.rows(rule))

    def validation(self, rule: str) -> tuple[np.ndarray, np.ndarray]:
        """(val_rel_cost, val_value) of the rule's points."""
        pts = [self.points[i] for i in self.rows(rule)]
        if any("val_value" not in p for p in pts):
            raise MissingRuns(f"{self.dir}: points without validation numbers (val_value), made before points were "
                              "measured on validation: run it again to choose on validation")
        return np.array([p["val_rel_cost"] for p in pts]), np.array([p["val_value"] for p in pts])


def load_runs(*dirs: str | Path) -> list[Run]:
    """Every run under the given directories, at any depth (a directory holding points.jsonl)."""
    runs = []
    for d in map(Path, dirs):
        for points in sorted(d.rglob("points.jsonl")):
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


def choose_by_seed(runs: list[Run], want: dict) -> dict[int, Run]:
    """seed -> a run matching `want`: among the runs with the first matching run's setting, per seed,
    the one whose TUNED_KEYS are best on validation (evidence.validation_score of the wanted rule's
    curve); test numbers play no part."""
    found = [r for r in runs if matches(r.setting, want)]
    if not found:
        return {}
    by_seed: dict[int, list[Run]] = {}
    for run in found:
        if run.setting == found[0].setting:
            by_seed.setdefault(run.seed, []).append(run)
    chosen = {}
    for seed, candidates in sorted(by_seed.items()):
        metric = candidates[0].dense["metric"]
        scores = validation_score([r.validation(want["rule"]) for r in candidates], metric) \
            if len(candidates) > 1 else [0.0]
        chosen[seed] = candidates[int(np.argmax(scores))]
    return chosen


def search_grid(runs: list[Run], want: dict) -> dict[str, list]:
    """The values of each TUNED_KEY that the runs matching `want` searched (as choose_by_seed groups them)."""
    found = [r for r in runs if matches(r.setting, want)]
    found = [r for r in found if r.setting == found[0].setting]
    return {k: sorted({r.tuned[k] for r in found if r.tuned[k] is not None}) for k in TUNED_KEYS}


def on_edge(grid: dict[str, list], chosen: dict[int, Run]) -> list[dict]:
    """Each seed's chosen setting that sits on the edge of a searched range (its lowest or highest
    value, where more than one was searched): a sign the grid may not hold the optimum."""
    return [{"seed": seed, "key": k, "value": run.tuned[k], "edge": "lowest" if run.tuned[k] == values[0] else "highest"}
            for seed, run in sorted(chosen.items()) for k, values in grid.items()
            if len(values) > 1 and run.tuned[k] in (values[0], values[-1])]


def select_seeds(runs: list[Run], wanted: dict[str, dict], figure: str, command: str) -> dict[str, dict[int, Run]]:
    """label -> {seed: run} (choose_by_seed) for each of `wanted`, on the seeds every label has.
    Raises MissingRuns naming every label without a run."""
    found = {label: choose_by_seed(runs, want) for label, want in wanted.items()}
    missing = [f"{label} ({', '.join(f'{k}={v}' for k, v in wanted[label].items())})"
               for label, by_seed in found.items() if not by_seed]
    if missing:
        where = sorted({str(r.dir.parent) for r in runs}) or ["no runs found"]
        raise MissingRuns(f"{figure}: missing runs: {'; '.join(missing)}. Looked in: {', '.join(where)}. "
                          f"Make them with: {command}")
    shared = set.intersection(*(set(by_seed) for by_seed in found.values()))
    return {label: {s: r for s, r in by_seed.items() if s in shared} for label, by_seed in found.items()}


def compare(pairs: list[tuple[Run, str, Run, str]], resamples: int) -> dict:
    """Run A's curve of its rule minus run B's (positive = A better) on test, one (A, rule, B, rule)
    per seed, at COST_GRID with intervals over seeds and test examples, summarised at CHECK_AT and the worst cost
    (evidence.paired_margins, evidence.summarise)."""
    curves = [(a.test_curve(rule_a), b.test_curve(rule_b)) for a, rule_a, b, rule_b in pairs]
    return summarise(paired_margins(curves, COST_GRID, resamples), CHECK_AT)


def cheapest_by_seed(runs: dict[int, Run], rule: str) -> dict:
    """Per seed, the rule's point of lowest validation rel_cost within the tolerance of dense on
    validation (results.cheapest_within), with its test numbers; then their mean and 95% t-interval
    over the seeds that have one."""
    rows = {}
    for seed, run in sorted(runs.items()):
        p = cheapest_within([run.dense, *run.curve(rule)])
        rows[seed] = None if p is None else {
            "tau": p["tau"], "k": p["k"], "val_rel_cost": p["val_rel_cost"], "val_value": p["val_value"],
            "rel_cost": p["rel_cost"], "value": p["value"], "minus_dense": p["value"] - run.dense["value"]}
    found = [r for r in rows.values() if r]
    return {"tolerance": TOLERANCE[next(iter(runs.values())).dense["metric"]], "per_seed": rows,
            "seeds_without": [s for s, r in rows.items() if r is None],
            **{k: t_interval([r[k] for r in found]) for k in ("rel_cost", "value", "minus_dense")}}


def frontier(points: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto frontier (best metric at each cost or less), as (rel_cost, value) arrays."""
    return pareto(np.array([p["rel_cost"] for p in points]), np.array([p["value"] for p in points]), metric)


def metric_label(metric: str) -> str:
    return {"accuracy": "test accuracy", "loss": "test loss (lower is better)"}.get(metric, metric)


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:  # no creation date in the PDF: the same figure gives the same file
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    return paths


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
