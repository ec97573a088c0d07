"""Statistics that turn accuracy-cost curves into evidence: confidence intervals over seeds, paired
bootstrap comparisons of two curves over test examples and seeds, and choices made on validation.

A curve is a run's converted points of one selection rule, with each point's per-example sums
(results.py, examples.npz): resampling examples recomputes every point's metric and rel_cost
exactly as the evaluation would have on the resampled split. Curves are compared on their Pareto
frontiers (`pareto`), linearly interpolated, as the figures draw them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .tasks import sign

LEVEL = 0.95  # every interval here


def t_interval(values, level: float = LEVEL) -> dict:
    """Mean and its Student-t confidence interval over independent replicates (seeds); with one
    replicate the interval is unknown (None)."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    if len(x) == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(x)}


@dataclass
class Curve:
    """One run's points of one rule on one split, with their per-example sums [P, N]."""

    metric: str
    sums: np.ndarray  # the metric's numerator per point and example
    counts: np.ndarray  # its denominator (1 per example for accuracy; target tokens for a loss)
    macs: np.ndarray
    dense_macs: np.ndarray  # [N]: the dense model's MACs, rel_cost's denominator

    @classmethod
    def of(cls, points: list[dict], examples: dict, rows: list[int]) -> "Curve":
        """The points `rows` (indices into points.jsonl) of a run, from its examples of one split."""
        e = examples
        return cls(points[0]["metric"], e["sum"][rows], e["count"][rows], e["macs"][rows], e["dense_macs"][0])

    def resampled(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """weights [B, N] (how often each example is drawn) -> (rel_cost, value), [B, P] each."""
        values = (weights @ self.sums.T) / (weights @ self.counts.T)
        costs = (weights @ self.macs.T) / (weights @ self.dense_macs)[:, None]
        return costs, values

    @property
    def measured(self) -> tuple[np.ndarray, np.ndarray]:
        """(rel_cost, value) [P] each, as measured on the whole split."""
        costs, values = self.resampled(np.ones((1, self.sums.shape[1])))
        return costs[0], values[0]


def pareto(costs: np.ndarray, values: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The Pareto frontier of points (costs [P], values [P]): each point better than every cheaper
    one, cheapest first, as (costs, values) arrays."""
    s = sign(metric)  # compare as "higher is better"
    order = np.argsort(costs, kind="stable")
    keep_c, keep_v = [], []
    for c, v in zip(costs[order], values[order]):
        if not keep_v or s * v > s * keep_v[-1]:
            keep_c.append(c)
            keep_v.append(v)
    return np.array(keep_c), np.array(keep_v)


def frontier_at(costs: np.ndarray, values: np.ndarray, metric: str, at: np.ndarray) -> np.ndarray:
    """The Pareto frontier of points (costs [P], values [P]) linearly interpolated at `at`; NaN
    outside [the cheapest point's cost, the dearest's]."""
    keep_c, keep_v = pareto(costs, values, metric)
    out = np.interp(at, keep_c, keep_v)
    out[(at < keep_c[0]) | (at > costs.max())] = np.nan
    return out


def example_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n]: how often each of n examples is drawn in each bootstrap resample."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)


def seeds_and_examples(per_seed, seeds: int, n: int, resamples: int = 2000, seed: int = 0,
                       level: float = LEVEL) -> dict:
    """A statistic averaged over seeds, and its interval, from two sources of error: the seeds
    (independent trainings) and the test examples (one split, shared by every seed).
    per_seed(s, weights [B, n]) -> [B, G]: seed s's statistic under each weighting of the examples.

    The interval is mean +- t(seeds - 1) * sqrt(var_seeds / seeds + var_examples): var_seeds is the
    spread of the seeds' statistics on the whole split, var_examples that of their mean over
    bootstrap resamples of the examples (the same draw for every seed). A percentile bootstrap that
    also resamples the seeds covered 76-87% instead of 95% with three seeds in simulation
    (tests/test_coverage.py), since three values understate their own spread; with one seed, the
    examples' percentile interval is all there is.
    Returns {"mean", "lo", "hi", "valid" (the fraction of resamples where it is finite), "per_seed"
    ([S, G], each seed on the whole split)}, arrays over G."""
    rng = np.random.default_rng(seed)
    measured = np.stack([per_seed(s, np.ones((1, n)))[0] for s in range(seeds)])  # [S, G]
    mean = measured.mean(0)
    weights = example_weights(n, resamples, rng)  # one draw of examples for every seed: they share the split
    boot = np.mean([per_seed(s, weights) for s in range(seeds)], axis=0)  # [B, G]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: costs no resample reaches stay NaN
        if seeds == 1:
            lo, hi = np.nanpercentile(boot, [50 * (1 - level), 50 * (1 + level)], axis=0)
        else:
            spread = measured.var(0, ddof=1) / seeds + np.nanvar(boot, 0, ddof=1)
            half = stats.t.ppf(0.5 + level / 2, seeds - 1) * np.sqrt(spread)
            lo, hi = mean - half, mean + half
    return {"mean": mean, "lo": lo, "hi": hi, "valid": np.isfinite(boot).mean(0), "per_seed": measured}


def frontiers(curve: Curve, weights: np.ndarray, at: np.ndarray) -> np.ndarray:
    """[B, len(at)]: the curve's frontier at `at` under each weighting of its examples."""
    costs, values = curve.resampled(weights)
    return np.stack([frontier_at(costs[i], values[i], curve.metric, at) for i in range(len(weights))])


def paired_margins(pairs: list[tuple[Curve, Curve]], at: np.ndarray, resamples: int = 2000,
                   seed: int = 0, level: float = LEVEL) -> dict:
    """A minus B (sign-adjusted: positive = A better) at the costs `at`, averaged over the pairs (one
    per seed: A and B trained from the same seed's dense model), with its interval over seeds and
    test examples (seeds_and_examples): the same resampled examples for A and B, both curves
    recomputed and their frontiers interpolated. Returns {"at", "mean" (the measured margin), "lo",
    "hi", "valid" (the fraction of resamples in which both curves reach each cost), "per_seed"
    ([S, len(at)]: each pair's margin)}."""
    n = pairs[0][0].sums.shape[1]
    if any(c.sums.shape[1] != n for pair in pairs for c in pair):
        raise ValueError("the curves of a paired comparison must be measured on the same examples")
    s = sign(pairs[0][0].metric)

    def margin(i: int, weights: np.ndarray) -> np.ndarray:
        a, b = pairs[i]
        return s * (frontiers(a, weights, at) - frontiers(b, weights, at))

    return {"at": at, **seeds_and_examples(margin, len(pairs), n, resamples, seed, level)}


def curve_band(curves: list[Curve], at: np.ndarray, resamples: int = 2000, seed: int = 0,
               level: float = LEVEL) -> dict:
    """The seeds' mean frontier at `at` with its interval over seeds and test examples."""
    n = curves[0].sums.shape[1]
    return {"at": at, **seeds_and_examples(lambda i, w: frontiers(curves[i], w, at), len(curves), n,
                                           resamples, seed, level)}


def summarise(comparison: dict, check_at: tuple[float, ...]) -> dict:
    """The JSON-able summary of `paired_margins` over a grid: the margin at each of `check_at`, at
    the grid's worst measured cost, and the costs where B leads with an interval excluding 0."""
    at, mean, lo, hi = (comparison[k] for k in ("at", "mean", "lo", "hi"))

    def row(i: int) -> dict:
        return {"rel_cost": float(at[i]), "mean": _num(mean[i]), "lo": _num(lo[i]), "hi": _num(hi[i]),
                "valid": float(comparison["valid"][i]), "per_seed": [_num(x) for x in comparison["per_seed"][:, i]]}

    finite = np.flatnonzero(np.isfinite(mean))
    out = {"shared_range": [float(at[finite[0]]), float(at[finite[-1]])] if len(finite) else None,
           "at": {f"{c:g}": (row(int(np.argmin(np.abs(at - c)))) if len(finite) and at[finite[0]] <= c <= at[finite[-1]]
                            else None) for c in check_at},
           "worst": row(int(finite[np.argmin(mean[finite])])) if len(finite) else None}
    lead = [float(at[i]) for i in finite if np.isfinite(hi[i]) and hi[i] < 0]
    out["b_leads_excluding_0"] = [min(lead), max(lead)] if lead else None
    return out


def describe(c: dict | None, kind: str, metric: str) -> str:
    """A mean with its 95% interval [lo, hi] as text. kind: "value" (a metric: accuracy in %, a loss
    as it is), "margin" (a difference of metrics: accuracy points, nats of loss) or "cost" (rel_cost)."""
    if c is None or c.get("mean") is None:
        return "none"
    accuracy = metric == "accuracy"
    fmt = {"value": (lambda x: f"{100 * x:.2f}%" if accuracy else f"{x:.4f}"),
           "margin": (lambda x: f"{100 * x:+.2f}" if accuracy else f"{x:+.4f}"),
           "cost": (lambda x: f"{x:.3f}")}[kind]
    unit = (" points" if accuracy else " nats") if kind == "margin" else ""
    if c.get("lo") is None:
        return f"{fmt(c['mean'])}{unit} (one seed: no interval)"
    return f"{fmt(c['mean'])}{unit} [{fmt(c['lo'])}, {fmt(c['hi'])}]"


def _num(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def validation_score(curves: list[tuple[np.ndarray, np.ndarray]], metric: str, grid: int = 50) -> list[float]:
    """How good each of several candidate curves (validation rel_cost, value) is, for choosing among
    them (a router's lr and epochs): its frontier's mean metric over the cost range all candidates
    share, sign-adjusted (higher is better). Uses validation numbers only."""
    lo = max(float(c.min()) for c, _ in curves)
    hi = min(float(c.max()) for c, _ in curves)
    at = np.linspace(lo, hi, grid) if hi > lo else np.array([lo])
    return [float(sign(metric) * np.nanmean(frontier_at(c, v, metric, at))) for c, v in curves]
