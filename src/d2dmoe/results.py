"""The results contract and its reporting: `points.jsonl`, `pareto.png`, a printed table, W&B.

points.jsonl holds one JSON object per evaluated point with at least POINT_KEYS. Figure scripts and
outside tools read it: keep the keys stable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tasks import within

# how far from dense a point may be and still count as keeping its quality
TOLERANCE = {"accuracy": 0.01, "loss": 0.02}  # absolute accuracy; relative loss

POINT_KEYS = ("model", "data", "method", "rule", "tau", "k", "alpha", "num_experts", "macs", "rel_cost",
              "metric", "value")
TABLE_KEYS = ("method", "rule", "tau", "k", "alpha", "num_experts", "experts_per_token", "macs", "rel_cost",
              "value")


def write_points(points: list[dict], out_dir: Path) -> Path:
    path = Path(out_dir) / "points.jsonl"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in points))
    os.replace(tmp, path)
    return path


def read_points(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def label(p: dict) -> str:
    if p["rule"] == "dynk":
        return f"tau={p['tau']:g}"
    return f"k={p['k']}" if p["rule"] == "topk" else p["rule"]


def plot_pareto(points: list[dict], path: Path) -> Path:
    """The metric against rel_cost, one line per (method, rule), the dense reference marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        if p["method"] != "dense":
            groups.setdefault((p["method"], p["rule"], p["alpha"]), []).append(p)
    for (method, rule, alpha), pts in groups.items():
        pts = sorted(pts, key=lambda p: p["rel_cost"])
        ax.plot([p["rel_cost"] for p in pts], [p["value"] for p in pts], "o-", ms=4,
                label=f"{method} {rule} (alpha={alpha:g})")
        for p in pts:
            ax.annotate(label(p), (p["rel_cost"], p["value"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
    for p in points:
        if p["method"] == "dense":
            ax.plot([p["rel_cost"]], [p["value"]], "k*", ms=12, label="dense")
            if p["metric"] == "loss":
                ax.axhline(p["value"] * (1 + TOLERANCE["loss"]), color="gray", ls=":", lw=1, label="dense + 2%")
            else:
                ax.axhline(p["value"] - TOLERANCE["accuracy"], color="gray", ls=":", lw=1, label="dense - 1 point")
    first = points[0]
    ax.set_xlabel("relative cost (MACs per sample / dense MACs)")
    ax.set_ylabel(first["metric"] + (" (lower is better)" if first["metric"] == "loss" else ""))
    ax.set_title(f"{first['model']} on {first['data']}  (dynamic-k: expert runs iff r >= tau * max r)",
                 fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return Path(path)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
    return str(v)


def table(points: list[dict]) -> str:
    rows = [[fmt(p.get(k)) for k in TABLE_KEYS] for p in points]
    header = list(TABLE_KEYS[:-1]) + [points[0]["metric"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def log_wandb(run, points: list[dict], png: Path) -> None:
    import wandb

    columns = sorted({k for p in points for k in p})
    data = wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])
    run.log({"points": data,
             "pareto": wandb.plot.scatter(data, "rel_cost", "value", title="metric vs relative cost"),
             "pareto_png": wandb.Image(str(png))})


def cheapest_within(points: list[dict], tolerance: float | None = None) -> dict | None:
    """The converted point of lowest rel_cost that keeps the dense quality: accuracy at most
    `tolerance` below dense (default 1 point), or loss at most `tolerance` above it, relative
    (default 2%)."""
    dense = next(p for p in points if p["method"] == "dense")
    tol = TOLERANCE[dense["metric"]] if tolerance is None else tolerance
    ok = [p for p in points if p["method"] != "dense" and within(dense["metric"], p["value"], dense["value"], tol)]
    return min(ok, key=lambda p: p["rel_cost"], default=None)
