"""Figure wall-clock: one MoE layer's time against the dense MLP's, as a function of the fraction
of experts executed, next to the ratio of counted FLOPs (the limit), from bench_wallclock.json.

    python experiments/bench_wallclock.py && python experiments/fig_wallclock.py
    python experiments/fig_wallclock.py --input benchmark/bench_wallclock_cuda.json --name fig_wallclock_cuda
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from d2dmoe.figures import pyplot, save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="benchmark/bench_wallclock.json")
    parser.add_argument("--out", default="figures")
    parser.add_argument("--name", default="fig_wallclock", help="output file name (.png, .pdf)")
    args = parser.parse_args(argv)
    path = Path(args.input)
    if not path.exists():
        sys.exit(f"fig_wallclock: {path} is missing. Make it with: python experiments/bench_wallclock.py")
    bench = json.loads(path.read_text())
    rows = bench["layer"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["size"], r.get("experts"), r.get("expert_size")), []).append(r)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (size, experts, expert_size), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["fraction"])
        label = f"{size}" + (f", {experts} experts of {expert_size}" if experts else "")
        line, = ax.plot([r["fraction"] for r in rs], [r["time_ratio"] for r in rs], "o-", ms=3, label=f"time: {label}")
        ax.plot([r["fraction"] for r in rs], [r["flop_ratio"] for r in rs], ":", color=line.get_color(), lw=1)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("fraction of experts executed per token")
    ax.set_ylabel("MoE layer time / dense MLP time\n(dotted: counted FLOP ratio, router included)")
    where = bench["device"] if bench["device"] != "cpu" else bench.get("cpu") or "cpu"  # a GPU, or the CPU's name
    ax.set_title(f"one layer, 32 x 128 tokens, {where}, {bench['threads']} threads, "
                 f"{bench.get('impl', 'gather')} execution, {bench.get('dtype', 'float32')}, "
                 f"median of {bench['repeats']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    print("wrote", *save(fig, args.out, args.name))
    return 0


if __name__ == "__main__":
    main()
