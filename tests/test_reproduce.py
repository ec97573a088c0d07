"""experiments/reproduce.py: every figure JSON and the README's results block are what the committed
per-seed data gives, and nothing in figures/ is stale."""
import json
import shutil
from pathlib import Path

from tests.test_figures import DYNK, TOPK, make_run, script

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_figures_and_readme_are_what_the_committed_data_gives():
    """What CI checks: a rebuild from figures/data and benchmark/ changes nothing."""
    assert script("reproduce").check() == []


def synthetic_root(tmp_path: Path) -> Path:
    """A checkout with a README and one panel's per-seed data (three seeds, both methods)."""
    root = tmp_path / "repo"
    (root / "figures").mkdir(parents=True)
    shutil.copyfile(ROOT / "README.md", root / "README.md")
    data = root / "figures" / "data" / "fig_main_bbc"
    moef = {"method": "moefication", "router": "moefication", "alpha": 0.0}
    for s in range(3):
        make_run(data / f"seed{s}" / "0", {"seed": s}, {"dynk": [(x, c, v - 0.01 * s) for x, c, v in DYNK]})
        make_run(data / f"seed{s}" / "1", {**moef, "seed": s}, {"topk": TOPK})
    return root


def test_a_rebuild_is_checked_number_by_number_and_stale_files_are_named(tmp_path):
    reproduce = script("reproduce")
    root = synthetic_root(tmp_path)
    assert reproduce.main(["--root", str(root)]) == 0
    made = json.loads((root / "figures" / "fig_main_default.json").read_text())
    assert made["tiny/toy"]["seeds"] == [0, 1, 2]
    assert "`tiny/toy` on the test split, seeds 0, 1, 2" in (root / "README.md").read_text()
    assert reproduce.check(root) == []

    made["tiny/toy"]["d2dmoe_minus_moefication"]["at"]["0.5"]["mean"] += 0.01  # one number moved
    (root / "figures" / "fig_main_default.json").write_text(json.dumps(made))
    (root / "figures" / "fig_old.png").write_bytes(b"made by hand")
    problems = reproduce.check(root)
    assert any("fig_main_default.json differs" in p for p in problems)
    assert any("fig_old.png is stale" in p for p in problems)
    assert any("README.md's results block differs" in p for p in problems)  # rendered from the moved number


def test_collect_keeps_the_results_of_every_job_and_the_command(tmp_path):
    sweep = tmp_path / "results" / "sweep"
    make_run(sweep / "seed0" / "3", {}, {"dynk": DYNK})
    (sweep / "seed0" / "3" / ".hydra").mkdir()
    (sweep / "seed0" / "3" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (sweep / "seed0" / "3" / "pareto.png").write_bytes(b"png")
    root = tmp_path / "repo"
    assert script("reproduce").collect(sweep, "fig_main_bbc", "python run.py -m experiment=fig_main", root) == 1
    job = root / "figures" / "data" / "fig_main_bbc" / "seed0" / "3"
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()) == [
        ".hydra/config.yaml", "examples.npz", "points.jsonl", "stats.json"]
    assert (root / "figures" / "data" / "fig_main_bbc" / "commands.txt").read_text() == \
        "python run.py -m experiment=fig_main\n"
