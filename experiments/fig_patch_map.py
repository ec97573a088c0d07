"""Figure patch map (ViT): executed experts per image patch, averaged over the MoE layers, at one
tau: the mean over every test image, then single test images with their map laid over them.

    python run.py -m experiment=fig_patch_map && python experiments/fig_patch_map.py --tau 0.3
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from d2dmoe.figures import TAU_NOTE, MissingRuns, load_runs, pyplot, save, select

COMMAND = "python run.py -m experiment=fig_patch_map"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", default=["results/fig_patch_map"])
    parser.add_argument("--tau", type=float, default=0.3)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)

    try:
        run = select(load_runs(*args.results), {"ViT": {"rule": "dynk"}}, "fig_patch_map", COMMAND, stats=True)["ViT"]
        npz = Path(run.dir) / "patch_maps.npz"
        if not npz.exists():
            raise MissingRuns(f"fig_patch_map: {run.dir} has no patch_maps.npz (not a ViT run?). Make it with: {COMMAND}")
    except MissingRuns as err:
        sys.exit(str(err))
    saved = np.load(npz)
    index = next((i for i, t in enumerate(saved["taus"]) if math.isclose(float(t), args.tau)), None)
    if index is None:
        sys.exit(f"fig_patch_map: no tau={args.tau} in {npz}; it has {saved['taus'].tolist()}")
    q = run.stats["points"][index]
    point = next(p for p in run.curve("dynk") if p["tau"] is not None and math.isclose(p["tau"], args.tau))
    mean_map = np.array(q["patch_experts"])  # [gh, gw]
    images, maps = saved["images"], saved["maps"][index]  # [N, C, H, W], [N, gh, gw]
    shown = min(args.images, len(images))
    vmax = max(float(maps[:shown].max()), float(mean_map.max()))

    plt = pyplot()
    fig, axes = plt.subplots(1, shown + 1, figsize=(2.4 * (shown + 1), 2.8))
    im = axes[0].imshow(mean_map, cmap="viridis", vmin=0, vmax=vmax)
    axes[0].set_title("mean over test images", fontsize=8)
    for ax, image, m in zip(axes[1:], images[:shown], maps[:shown]):
        gray = image.mean(0)  # [H, W], channels averaged
        gray = (gray - gray.min()) / max(float(np.ptp(gray)), 1e-8)
        ax.imshow(gray, cmap="gray", extent=(0, 1, 1, 0))
        ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, alpha=0.55, extent=(0, 1, 1, 0))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), fraction=0.02, label="experts executed per patch\n(mean over layers)")
    s = run.setting
    fig.suptitle(f"{s['model']} on {s['data']}, {s['num_experts']} experts, tau={args.tau:g} ({TAU_NOTE}): "
                 f"{point['metric']} {point['value']:.4f}, rel_cost {point['rel_cost']:.3f}", fontsize=8)
    print("wrote", *save(fig, args.out, "fig_patch_map"))
    return 0


if __name__ == "__main__":
    main()
