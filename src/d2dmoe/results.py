"""The results contract and its reporting: `points.jsonl`, `examples.npz`, `stats.json`,
`pareto.png`, a printed table, W&B.

points.jsonl holds one JSON object per evaluated point with at least POINT_KEYS. Figure scripts and
outside tools read it: keep the keys stable. `value`, `rel_cost` and `macs` are measured on the test
split, `val_value` and `val_rel_cost` on validation: choices (a tau, a router setting, the cheapest
point within 1 point of dense) are made on the val_ fields, the test fields only report them. Each
point also carries its task's fidelity to the dense reference on both splits (`agreement` and
`val_agreement` for classifiers, `kl_from_dense` and `val_kl_from_dense` for language models).
examples.npz holds the same sums per example, `<split>_<key>` [points, N] (split `test` or
`validation`; key in phases.evaluate.EXAMPLE_KEYS; row i is line i of points.jsonl, examples in the
split's evaluation order, the same in every run on the same data): what confidence intervals
resample and what pairs two runs on the same examples. stats.json holds what the figures need beyond the
points (d2dmoe.stats): {"activation": per-layer activation sparsity of the converted model,
"attention_activation" (with attention.convert): the same for the projections' MLPs, "points":
per tau (or k), per-layer executed-expert histograms and, for ViTs, the mean executed experts per
patch}. ViT runs also write patch_maps.npz: `images` [N, C, H, W] (the first test
images, as the model sees them) and `maps` [points, N, gh, gw] (executed experts per patch,
averaged over layers), `taus`/`ks` naming the points.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .tasks import higher_is_better, threshold, within

# how far from dense a point may be and still count as keeping its quality
TOLERANCE = {"accuracy": 0.01, "loss": 0.02}  # absolute accuracy; relative loss

POINT_KEYS = ("model", "data", "method", "rule", "tau", "k", "alpha", "num_experts", "macs", "rel_cost",
              "metric", "value", "val_value", "val_rel_cost", "seed")
TABLE_KEYS = ("method", "rule", "tau", "k", "sparsity", "alpha", "num_experts", "experts_per_token", "attention",
              "attention_experts_per_token", "macs", "rel_cost", "value", "agreement", "kl_from_dense",
              "val_rel_cost", "val_value")


def write_points(points: list[dict], out_dir: Path) -> Path:
    text = "".join(json.dumps(p) + "\n" for p in points)
    return atomic_write(Path(out_dir) / "points.jsonl", lambda p: p.write_text(text))


def write_examples(examples: dict, out_dir: Path) -> Path | None:
    """examples.npz from {split: {key: [points, N]}} (see the module docstring)."""
    if not examples:
        return None
    import numpy as np

    arrays = {f"{split}_{key}": values for split, by_key in examples.items() for key, values in by_key.items()}

    def save(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(f, **arrays)

    return atomic_write(Path(out_dir) / "examples.npz", save)


def read_examples(run_dir: Path) -> dict:
    """{split: {key: [points, N] array}} from a run's examples.npz."""
    import numpy as np

    out: dict = {}
    with np.load(Path(run_dir) / "examples.npz") as f:
        for name in f.files:
            split, key = name.split("_", 1)
            out.setdefault(split, {})[key] = f[name]
    return out


def read_points(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def atomic_write(path: Path, write) -> Path:
    """`write(tmp_path)` then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_stats(results, out_dir: Path) -> None:
    """stats.json, and patch_maps.npz when the model has image patches (see the module docstring)."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / "stats.json", lambda p: p.write_text(json.dumps(results.stats)))
    if results.patch_maps:
        import numpy as np
        import torch

        names = results.stats["points"]
        arrays = {"images": torch.stack(results.patch_images).numpy(),
                  "maps": torch.stack([torch.stack(m) for m in results.patch_maps]).numpy(),
                  "taus": np.array([q["tau"] if q["tau"] is not None else np.nan for q in names]),
                  "ks": np.array([q["k"] if q["k"] is not None else -1 for q in names])}

        def save(path: Path) -> None:
            with open(path, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez_compressed(f, **arrays)

        atomic_write(out_dir / "patch_maps.npz", save)


def read_stats(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "stats.json").read_text())


def label(p: dict) -> str:
    if p["rule"] == "dynk":
        return f"tau={p['tau']:g}"
    if p.get("sparsity") is not None:  # a training-free baseline's target
        return f"s={p['sparsity']:g}"
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
        trained = f" (alpha={alpha:g})" if alpha is not None else " (training-free)"
        ax.plot([p["rel_cost"] for p in pts], [p["value"] for p in pts], "o-", ms=4,
                label=f"{method} {rule}{trained}" if rule != method else f"{method}{trained}")
        for p in pts:
            ax.annotate(label(p), (p["rel_cost"], p["value"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
    for p in points:
        if p["method"] == "dense":
            ax.plot([p["rel_cost"]], [p["value"]], "k*", ms=12, label="dense")
            ax.axhline(threshold(p["metric"], p["value"], TOLERANCE[p["metric"]]), color="gray", ls=":", lw=1,
                       label="dense - 1 point" if higher_is_better(p["metric"]) else "dense + 2%")
    first = points[0]
    ax.set_xlabel("relative cost (MACs per sample / dense MACs)")
    ax.set_ylabel(first["metric"] + ("" if higher_is_better(first["metric"]) else " (lower is better)"))
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
    converted = any(p.get("attention") for p in points)  # the attention columns only when they say something
    keys = [k for k in TABLE_KEYS if (converted or not k.startswith("attention"))
            and any(k in p for p in points)]
    rows = [[fmt(p.get(k)) for k in keys] for p in points]
    metric = points[0]["metric"]  # value: the test split's; val_value: validation's
    header = [{"value": metric, "val_value": f"val_{metric}"}.get(k, k) for k in keys]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def log_wandb(run, points: list[dict], png: Path, stats: dict | None = None) -> None:
    """The points as a table with a scatter plot and the PNG; with stats, also the tables
    `expert_use` (tau, k, layer, experts_per_token) and `activation_sparsity` (layer, zero_fraction,
    zero_fraction_std), each with a line plot over layers."""
    import wandb

    columns = sorted({k for p in points for k in p})
    data = wandb.Table(columns=columns, data=[[p.get(c) for c in columns] for p in points])
    logged = {"points": data,
              "pareto": wandb.plot.scatter(data, "rel_cost", "value", title="metric vs relative cost"),
              "pareto_png": wandb.Image(str(png))}
    if stats:
        use = wandb.Table(columns=["tau", "k", "layer", "experts_per_token"],
                          data=[[q["tau"], q["k"], layer["layer"], layer["experts_per_token"]]
                                for q in stats["points"] for layer in q["layers"]])
        act = wandb.Table(columns=["layer", "zero_fraction", "zero_fraction_std"],
                          data=[[a["layer"], a["zero_fraction"], a["zero_fraction_std"]] for a in stats["activation"]])
        logged.update({"expert_use": use, "activation_sparsity": act,
                       "activation_sparsity_plot": wandb.plot.line(act, "layer", "zero_fraction",
                                                                   title="fraction of zero FFN activations per layer")})
    run.log(logged)


def cheapest_within(points: list[dict], tolerance: float | None = None) -> dict | None:
    """The converted point of lowest validation rel_cost that keeps the dense quality on validation:
    accuracy at most `tolerance` below dense (default 1 point), or loss at most `tolerance` above it,
    relative (default 2%). Chosen on validation only; its test fields report it."""
    dense = next(p for p in points if p["method"] == "dense")
    if "val_value" not in dense:
        raise ValueError("these points carry no validation numbers (val_value): they were made before points were "
                         "measured on validation; run them again to choose on validation")
    tol = TOLERANCE[dense["metric"]] if tolerance is None else tolerance
    ok = [p for p in points if p["method"] != "dense" and within(dense["metric"], p["val_value"], dense["val_value"], tol)]
    return min(ok, key=lambda p: p["val_rel_cost"], default=None)
