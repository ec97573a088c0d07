"""Every figure, its JSON and the README's results block, rebuilt from what is committed: the per-seed
results under figures/data/ and the benchmark JSON under benchmark/.

    python experiments/reproduce.py              # rebuild figures/ and the README's results block
    python experiments/reproduce.py --check      # rebuild elsewhere; exit 1 on any difference or stale file
    python experiments/reproduce.py --collect results/fig_main_dedup --as fig_main_bbc \\
        --command "python run.py -m experiment=fig_main seed=N ..."   # commit a sweep's per-seed data

STEPS is the registry: each figure, the script and arguments that make it, and the data it reads. A
figure whose data is not committed is pending: it is not made, and the README says so. A file in
figures/ that no step makes is stale, and `--check` fails on it: every figure can be made again
from git.

What `--collect` keeps of each job of a sweep (a folder holding points.jsonl): the points, the
per-example sums (examples.npz, compressed), stats.json, ViT patch maps, and Hydra's record of the
job's config and overrides; the W&B run and the PNG are left out.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = "figures"
DATA = "figures/data"
KEPT = ("points.jsonl", "examples.npz", "stats.json", "patch_maps.npz", ".hydra/config.yaml", ".hydra/overrides.yaml")


@dataclass(frozen=True)
class Step:
    name: str  # the output files' stem in figures/
    argv: tuple[str, ...]  # the script and its arguments; "{data}" stands for the data folders present
    data: tuple[str, ...] = ()  # folders under figures/data it reads (made when at least one is there)
    also: tuple[str, ...] = ()  # folders it reads too where they are there (runs another figure's sweep made)
    inputs: tuple[str, ...] = ()  # committed files it reads (made when all are there)
    outputs: tuple[str, ...] = (".png", ".pdf", ".json")


STEPS = (
    # the main figure: one panel per family whose sweep is committed
    Step("fig_main_default", ("experiments/fig_main.py", "--name", "fig_main_default", "--results", "{data}"),
         data=("fig_main_bbc", "fig_main_carer", "fig_main_gpt2", "fig_main_vit")),
    # the ablations, each from its own sweep; the phase-by-phase one also takes MoEfication and D2DMoE
    # from the default's panel where it is committed
    *(Step(f"fig_ablation_{name}", ("experiments/fig_ablations.py", name, "--results", "{data}"),
           data=(f"fig_ablation_{name}",), also=("fig_main_bbc",) if name == "phases" else ())
      for name in ("phases", "alpha", "expert_size", "activation", "attention")),
    Step("fig_wallclock", ("experiments/fig_wallclock.py",), inputs=("benchmark/bench_wallclock.json",),
         outputs=(".png", ".pdf")),
    *(Step(f"fig_wallclock_cuda_fused_{dtype}", ("experiments/fig_wallclock.py", "--input", f"benchmark/bench_wallclock_cuda_fused_{dtype}.json",
                                                 "--name", f"fig_wallclock_cuda_fused_{dtype}"),
           inputs=(f"benchmark/bench_wallclock_cuda_fused_{dtype}.json",), outputs=(".png", ".pdf"))
      for dtype in ("float32", "bfloat16")),
)


def present(step: Step, root: Path) -> list[str] | None:
    """The step's data folders committed under root (relative paths), or None when it is pending."""
    if not all((root / f).exists() for f in step.inputs):
        return None
    folders = [f"{DATA}/{d}" for d in step.data if (root / DATA / d).is_dir()]
    if step.data and not folders:
        return None
    return folders + [f"{DATA}/{d}" for d in step.also if (root / DATA / d).is_dir()]


def pending(root: Path = ROOT) -> list[Step]:
    return [s for s in STEPS if present(s, root) is None]


def make(root: Path, out: Path) -> list[Path]:
    """Run every step whose data is committed under root, writing into out; the files written."""
    written = []
    for step in STEPS:
        folders = present(step, root)
        if folders is None:
            continue
        script, *args = [a for arg in step.argv for a in (folders if arg == "{data}" else [arg])]
        subprocess.run([sys.executable, str(ROOT / script), *args, "--out", str(out)], cwd=root, check=True,
                       stdout=subprocess.DEVNULL)
        written += [out / f"{step.name}{ext}" for ext in step.outputs]
    return written


def same(a, b, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    """JSON values equal up to float rounding (another CPU's BLAS may differ in the last bits)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel, abs_) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
    return a == b


def check(root: Path = ROOT) -> list[str]:
    """What differs between the committed figures and a rebuild from the committed data, and which
    files in figures/ no step makes; [] when everything can be made again as it is."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        made = {p.name for p in make(root, Path(tmp))}
        for name in sorted(made):
            committed = root / FIGURES / name
            if not committed.exists():
                problems.append(f"{FIGURES}/{name} is made from committed data but not committed: run "
                                "python experiments/reproduce.py")
            elif name.endswith(".json") and not same(json.loads(committed.read_text()),
                                                     json.loads((Path(tmp) / name).read_text())):
                problems.append(f"{FIGURES}/{name} differs from what its committed data gives: run "
                                "python experiments/reproduce.py")
    for path in sorted((root / FIGURES).iterdir()):
        if path.is_file() and path.name not in made:
            problems.append(f"{FIGURES}/{path.name} is stale: no step of experiments/reproduce.py makes it from "
                            "committed data (commit its data with --collect and add a step, or remove it)")
    readme = subprocess.run([sys.executable, str(ROOT / "experiments" / "render_readme.py"), "--check", "--root",
                             str(root), "--readme", str(root / "README.md")], capture_output=True, text=True)
    if readme.returncode:
        problems.append(f"README.md's results block differs from the figures' JSON:\n{readme.stdout}{readme.stderr}")
    return problems


def collect(sweep: Path, name: str, command: str | None, root: Path = ROOT) -> int:
    """Copy what KEPT names of each job under `sweep` into figures/data/<name>/, at the same relative
    path; record the command. Returns the number of jobs copied."""
    dest = root / DATA / name
    jobs = sorted(p.parent for p in sweep.rglob("points.jsonl"))
    for job in jobs:
        for rel in KEPT:
            if (job / rel).exists():
                target = dest / job.relative_to(sweep) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(job / rel, target)
    if command:
        log = dest / "commands.txt"
        lines = log.read_text().splitlines() if log.exists() else []
        if command not in lines:
            log.write_text("\n".join([*lines, command]) + "\n")
    return len(jobs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail on any difference or stale file; write nothing")
    parser.add_argument("--collect", type=Path, help="a sweep directory whose per-job results to commit")
    parser.add_argument("--as", dest="name", help="with --collect: the folder under figures/data")
    parser.add_argument("--command", help="with --collect: the command that made the sweep")
    parser.add_argument("--root", type=Path, default=ROOT, help="where figures/, benchmark/ and README.md are")
    args = parser.parse_args(argv)
    if args.collect:
        if not args.name:
            parser.error("--collect needs --as NAME (the folder under figures/data)")
        print(f"collected {collect(args.collect, args.name, args.command, args.root)} jobs into {DATA}/{args.name}")
        return 0
    if args.check:
        problems = check(args.root)
        print("\n".join(problems) or "figures/ and the README's results block are what the committed data gives")
        return 1 if problems else 0
    for path in make(args.root, args.root / FIGURES):
        print("wrote", path.relative_to(args.root))
    for step in pending(args.root):
        print(f"pending (no committed data): {step.name}")
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "render_readme.py"), "--root", str(args.root),
                           "--readme", str(args.root / "README.md")]).returncode


if __name__ == "__main__":
    sys.exit(main())
