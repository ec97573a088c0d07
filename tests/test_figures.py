"""Figure scripts on small synthetic result directories: they write their PNG and PDF, compare curves
as stated, and name the missing runs when their inputs are incomplete."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from d2dmoe.evidence import frontier_at
from d2dmoe.figures import MissingRuns, default_alpha, frontier, load_runs, select
from d2dmoe.results import write_examples, write_points

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
LAYERS, EXPERTS = 2, 8
DEFAULT_ALPHA = default_alpha()  # the sparsified run the expert-use and phases figures look for


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


EXAMPLES = 100  # per split: values with two decimals are exact fractions of them


def point(setting: dict, rule: str, x, cost: float, value: float, val: tuple | None = None) -> dict:
    """val: (val_rel_cost, val_value); the test numbers when None."""
    val_cost, val_value = val or (cost, value)
    return {"model": "tiny", "data": "toy", "method": "d2dmoe", "router": "regression", "alpha": 0.01,
            "activation": "relu", "num_experts": EXPERTS, "expert_size": 4, "metric": "accuracy", "seed": 0,
            **setting, "rule": rule, "tau": x if rule == "dynk" else None, "k": x if rule == "topk" else None,
            "macs": cost * 100, "rel_cost": cost, "value": value, "val_rel_cost": val_cost, "val_value": val_value,
            "experts_per_token": 1.0}


def split_examples(points: list[dict], prefix: str) -> dict:
    """Per-example arrays [points, EXAMPLES] that reproduce each point's value and rel_cost on a split:
    the first value x EXAMPLES examples right, every example at the point's cost."""
    n = np.arange(EXAMPLES)
    sums = np.stack([(n < round(p[f"{prefix}value"] * EXAMPLES)).astype(float) for p in points])
    macs = np.stack([np.full(EXAMPLES, 100 * p[f"{prefix}rel_cost"]) for p in points])
    ones = np.ones_like(sums)
    return {"sum": sums, "count": ones, "macs": macs, "dense_macs": np.full_like(sums, 100.0),
            "fidelity_sum": ones, "fidelity_count": ones}


def make_run(path: Path, setting: dict, curves: dict[str, list[tuple]], patches: bool = False,
             val: dict[str, list[tuple]] | None = None) -> Path:
    """curves: rule -> [(tau or k, rel_cost, value)]; val: rule -> [(val_rel_cost, val_value)] (the test
    numbers when None); writes points.jsonl, examples.npz, stats.json (and patch maps)."""
    path.mkdir(parents=True)
    val = val or {}
    dense = {**point(setting, "dense", None, 1.0, 0.9), "method": "dense", "rule": "dense"}
    points = [dense] + [point(setting, rule, x, c, v, val[rule][i] if rule in val else None)
                        for rule, curve in curves.items() for i, (x, c, v) in enumerate(curve)]
    write_points(points, path)
    write_examples({"test": split_examples(points, ""), "validation": split_examples(points, "val_")}, path)
    zero = 0.9 if (setting.get("alpha", 0.01) or 0) > 0 else 0.5
    hist = [0] * 50
    hist[int((1 - zero) * 49)] = 100
    stats = {"activation": [{"layer": i, "zero_fraction": zero, "zero_fraction_std": 0.05,
                             "nonzero_fraction_hist": hist} for i in range(LAYERS)],
             "points": [{"rule": p["rule"], "tau": p["tau"], "k": p["k"],
                         "layers": [{"layer": i, "experts_per_token": 2.0,
                                     "experts_hist": [0, 5, 10, 5, 0, 0, 0, 0, 0]} for i in range(LAYERS)],
                         **({"patch_experts": np.full((2, 2), 3.0).tolist()} if patches else {})}
                        for p in points[1:]]}
    (path / "stats.json").write_text(json.dumps(stats))
    if patches:
        n = len(points) - 1
        np.savez_compressed(path / "patch_maps.npz", images=np.random.rand(3, 1, 8, 8),
                            maps=np.random.rand(n, 3, 2, 2) * 8, taus=np.array([p["tau"] for p in points[1:]]),
                            ks=np.full(n, -1))
    return path


DYNK = [(0.0, 1.0, 0.9), (0.3, 0.5, 0.88), (1.0, 0.3, 0.7)]
TOPK = [(8, 1.0, 0.9), (4, 0.6, 0.85), (1, 0.3, 0.5)]


def outputs(out: Path, name: str) -> bool:
    return all((out / f"{name}.{ext}").stat().st_size > 1000 for ext in ("png", "pdf"))


def test_frontier_and_interpolation():
    pts = [{"rel_cost": c, "value": v} for c, v in [(0.2, 0.5), (0.4, 0.8), (0.6, 0.7), (1.0, 0.9)]]
    costs, values = frontier(pts, "accuracy")
    assert costs.tolist() == [0.2, 0.4, 1.0] and values.tolist() == [0.5, 0.8, 0.9]  # 0.6 is dominated
    c, v = np.array([p["rel_cost"] for p in pts]), np.array([p["value"] for p in pts])
    assert frontier_at(c, v, "accuracy", np.array([0.7]))[0] == pytest.approx(0.85)
    assert np.isnan(frontier_at(c, v, "accuracy", np.array([0.1]))[0])
    assert frontier(pts, "loss")[0].tolist() == [0.2]  # for a loss, lower is better


def test_fig_main_compares_d2dmoe_with_moefication(tmp_path):
    make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK})
    make_run(tmp_path / "sweep" / "1", {"method": "moefication", "router": "moefication", "alpha": 0.0},
             {"topk": TOPK})
    script("fig_main").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
                             "--resamples", "200"])
    assert outputs(tmp_path / "out", "fig_main")
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    margin = summary["d2dmoe_minus_moefication"]
    assert margin["shared_range"] == pytest.approx([0.3, 1.0], abs=0.006)
    # at 0.5: D2DMoE 0.88; MoEfication between (0.3, 0.5) and (0.6, 0.85): 0.5 + 0.35 * 2/3
    at = margin["at"]["0.5"]
    assert at["mean"] == pytest.approx(0.88 - (0.5 + 0.35 * 2 / 3))
    assert margin["worst"]["mean"] >= 0 and margin["moefication_leads_excluding_0"] is None
    # dense 0.9 on validation: only tau 0 (rel_cost 1.0) is within 1 point
    assert summary["cheapest_within"]["rel_cost"]["mean"] == 1.0


def test_fig_main_panels_name_their_own_sweeps(tmp_path):
    """One figure from two families' sweeps: each panel records the sweeps its runs came from, so the
    README can print the command that made it."""
    for sweep, data in (("a", "toy"), ("b", "other")):
        make_run(tmp_path / sweep / "0", {"data": data}, {"dynk": DYNK})
        make_run(tmp_path / sweep / "1", {"data": data, "method": "moefication", "router": "moefication",
                                          "alpha": 0.0}, {"topk": TOPK})
    sweeps = [str(tmp_path / "a"), str(tmp_path / "b")]
    script("fig_main").main(["--results", *sweeps, "--out", str(tmp_path / "out"), "--resamples", "50"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())
    assert summary["tiny/toy"]["sweeps"] == sweeps[:1] and summary["tiny/other"]["sweeps"] == sweeps[1:]
    assert summary["tiny/toy"]["sparsity_epochs"] is None  # runs without their .hydra config


def test_fig_main_records_the_panels_sparsify_epochs(tmp_path):
    """The points carry alpha but not the sparsify epochs: the panel takes them from its D2DMoE runs'
    configs, so that the README can tell when a preset has moved on from them."""
    d2dmoe = make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK})
    make_run(tmp_path / "sweep" / "1", {"method": "moefication", "router": "moefication", "alpha": 0.0,
                                        "sparsity_epochs": 4}, {"topk": TOPK})
    (d2dmoe / ".hydra").mkdir()
    (d2dmoe / ".hydra" / "config.yaml").write_text("sparsity: {alpha: 0.01, epochs: 2}\n")
    script("fig_main").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
                             "--resamples", "50"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    assert summary["sparsity_epochs"] == 2 and summary["alpha"] == 0.01
    # points without sparsity_epochs take it from the job's config, as a tuned setting
    assert summary["chosen"]["d2dmoe"]["0"]["sparsity_epochs"] == 2
    assert summary["chosen"]["moefication"]["0"]["sparsity_epochs"] == 4  # the point's own key


def test_fig_main_chooses_moefications_sparsify_epochs_on_validation(tmp_path):
    """MoEfication run at two sparsify epochs: per seed, validation picks, as it does the router settings."""
    moef = {"method": "moefication", "router": "moefication", "alpha": 0.0}
    make_run(tmp_path / "s" / "0", {}, {"dynk": DYNK})
    make_run(tmp_path / "s" / "1", {**moef, "sparsity_epochs": 2}, {"topk": TOPK},
             val={"topk": [(c, v + 0.05) for _, c, v in TOPK]})
    make_run(tmp_path / "s" / "2", {**moef, "sparsity_epochs": 4}, {"topk": [(k, c, v + 0.02) for k, c, v in TOPK]})
    script("fig_main").main(["--results", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--resamples", "50"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    assert summary["chosen"]["moefication"]["0"]["sparsity_epochs"] == 2  # better on validation, worse on test
    assert summary["searched"]["moefication"]["sparsity_epochs"] == [2, 4]


def test_fig_main_adds_moefications_original_router_where_it_ran(tmp_path):
    """Runs with MoEfication's original router get their own curve and margin; the headline margin
    stays against the paper's MoEfication router, on its own seeds."""
    make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK})
    make_run(tmp_path / "sweep" / "1", {"method": "moefication", "router": "moefication", "alpha": 0.0},
             {"topk": TOPK})
    original = [(k, c, v - 0.05) for k, c, v in TOPK]  # 5 points below the paper's router everywhere
    make_run(tmp_path / "sweep" / "2", {"method": "moefication", "router": "moefication_original", "alpha": 0.0},
             {"topk": original})
    script("fig_main").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
                             "--resamples", "100"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    paper, own = summary["d2dmoe_minus_moefication"], summary["d2dmoe_minus_moefication_original"]
    assert paper["at"]["0.5"]["mean"] == pytest.approx(0.88 - (0.5 + 0.35 * 2 / 3))
    assert own["at"]["0.5"]["mean"] == pytest.approx(paper["at"]["0.5"]["mean"] + 0.05)
    assert set(summary["chosen"]) == {"d2dmoe", "moefication", "moefication_original"}


def test_fig_main_adds_the_training_free_baselines_where_they_ran(tmp_path):
    """A CATS run (its rule is its name, no router, no alpha) gets its curve and a margin of D2DMoE
    against it, measured on its own points; the headline margin stays against MoEfication."""
    make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK})
    make_run(tmp_path / "sweep" / "1", {"method": "moefication", "router": "moefication", "alpha": 0.0},
             {"topk": TOPK})
    cats = [(None, 0.8, 0.85), (None, 0.6, 0.6), (None, 0.45, 0.3)]
    make_run(tmp_path / "sweep" / "2", {"method": "cats", "router": None, "alpha": None, "num_experts": None},
             {"cats": cats})
    script("fig_main").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "out"),
                             "--resamples", "100"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    against = summary["d2dmoe_minus_cats"]
    # D2DMoE at 0.5: 0.88; CATS's frontier at 0.5 between (0.45, 0.3) and (0.6, 0.6): 0.3 + 0.3 / 3
    assert against["at"]["0.5"]["mean"] == pytest.approx(0.88 - 0.4)
    assert against["seeds"] == [0] and summary["d2dmoe_minus_moefication"]["at"]["0.5"]["mean"] != against["at"]["0.5"]["mean"]


def test_fig_main_margin_for_each_alpha(tmp_path):
    """A second D2DMoE alpha that wins at high cost where the first loses: each alpha's margin."""
    # as a fig_main sweep lays them out: the experiment's alpha, alpha 0, MoEfication
    make_run(tmp_path / "main" / "0", {}, {"dynk": [(0.0, 1.0, 0.88), (0.3, 0.5, 0.88), (1.0, 0.3, 0.7)]})
    make_run(tmp_path / "main" / "1", {"alpha": 0.0}, {"dynk": [(0.0, 1.0, 0.95), (0.3, 0.6, 0.9), (1.0, 0.3, 0.4)]})
    make_run(tmp_path / "main" / "2", {"method": "moefication", "router": "moefication", "alpha": 0.0},
             {"topk": TOPK})
    script("fig_main").main(["--results", str(tmp_path / "main"), "--out", str(tmp_path / "out"), "--name", "alphas",
                             "--resamples", "200"])
    assert outputs(tmp_path / "out", "alphas")
    summary = json.loads((tmp_path / "out" / "alphas.json").read_text())["tiny/toy"]
    assert set(summary["by_alpha"]) == {"0", "0.01"}
    worst = summary["d2dmoe_minus_moefication"]["worst"]
    assert worst["mean"] == pytest.approx(0.88 - 0.9)  # alpha 0.01, the headline, loses at cost 1
    assert summary["by_alpha"]["0.01"]["worst"] == worst
    assert summary["by_alpha"]["0"]["worst"]["mean"] < 0  # alpha 0 loses at cost 0.3 (0.4 against 0.5)


def test_fig_main_chooses_router_settings_on_validation(tmp_path):
    """Two router settings per method: the one validation favours is taken, whatever test says."""
    moef = {"method": "moefication", "router": "moefication", "alpha": 0.0}
    worse = [(c, v - 0.4) for _, c, v in DYNK]  # validation says: worse than the other setting
    make_run(tmp_path / "s" / "0", {"router_lr": 0.001}, {"dynk": DYNK}, val={"dynk": worse})
    make_run(tmp_path / "s" / "1", {"router_lr": 0.01}, {"dynk": [(x, c, v - 0.3) for x, c, v in DYNK]})
    make_run(tmp_path / "s" / "2", {**moef, "router_lr": 0.001}, {"topk": TOPK})
    script("fig_main").main(["--results", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--resamples", "50"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    assert summary["chosen"]["d2dmoe"]["0"]["router_lr"] == 0.01  # better on validation, worse on test
    # the search covered lr 0.001 and 0.01, and the choice sits on its edge; MoEfication searched one value
    assert summary["searched"]["d2dmoe"]["router_lr"] == [0.001, 0.01]
    assert summary["on_edge"] == {"d2dmoe": [{"seed": 0, "key": "router_lr", "value": 0.01, "edge": "highest"}],
                                  "moefication": []}
    assert summary["d2dmoe_minus_moefication"]["at"]["0.5"]["mean"] == pytest.approx(0.58 - (0.5 + 0.35 * 2 / 3))


def test_fig_main_statistics_on_several_seeds_with_a_validation_split_of_their_own(tmp_path):
    """Three seeds whose margins differ, and validation numbers unlike test ones: the margins are
    test margins, each D2DMoE seed is paired with the MoEfication seed of its own dense model, the
    interval is at least the seeds' Student-t interval, and the cheapest point reports its test cost."""
    from d2dmoe.evidence import t_interval

    d2dmoe_at_half, moef_at_half = [0.88, 0.80, 0.84], [0.80, 0.78, 0.70]  # test value at rel_cost 0.5, per seed
    moef = {"method": "moefication", "router": "moefication", "alpha": 0.0}
    for s in range(3):
        make_run(tmp_path / "s" / f"{s}d", {"seed": s}, {"dynk": [(0.0, 1.0, 0.9), (0.3, 0.5, d2dmoe_at_half[s]),
                                                                  (1.0, 0.3, 0.6)]},
                 val={"dynk": [(1.0, 0.9), (0.55, 0.895), (0.35, 0.6)]})
        make_run(tmp_path / "s" / f"{s}m", {**moef, "seed": s}, {"topk": [(8, 1.0, 0.9), (4, 0.5, moef_at_half[s]),
                                                                          (1, 0.3, 0.4)]},
                 val={"topk": [(1.0, 0.9), (0.5, 0.5), (0.3, 0.3)]})
    script("fig_main").main(["--results", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--resamples", "200"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    at = summary["d2dmoe_minus_moefication"]["at"]["0.5"]
    per_seed = [a - b for a, b in zip(d2dmoe_at_half, moef_at_half)]  # +0.08, +0.02, +0.14
    assert summary["d2dmoe_minus_moefication"]["seeds"] == [0, 1, 2]
    assert at["per_seed"] == pytest.approx(per_seed) and at["mean"] == pytest.approx(np.mean(per_seed))
    seeds_only = t_interval(per_seed)
    assert at["lo"] <= seeds_only["lo"] and at["hi"] >= seeds_only["hi"]
    # validation's cheapest point within 1 point of dense: tau 0.3 (validation 0.895 at rel_cost 0.55);
    # its test rel_cost is 0.5
    cheapest = summary["cheapest_within"]
    assert [r["rel_cost"] for r in cheapest["per_seed"].values()] == [0.5, 0.5, 0.5]
    assert [r["val_rel_cost"] for r in cheapest["per_seed"].values()] == [0.55, 0.55, 0.55]
    assert cheapest["rel_cost"]["mean"] == pytest.approx(0.5)
    assert cheapest["minus_dense"]["mean"] == pytest.approx(np.mean(d2dmoe_at_half) - 0.9)


def test_fig_main_names_the_missing_runs(tmp_path):
    make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK})
    with pytest.raises(SystemExit) as err:
        script("fig_main").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    message = str(err.value.code)
    assert ("missing runs: MoEfication (model=tiny, data=toy, method=moefication, router=moefication, "
            "rule=topk)") in message
    assert "python run.py -m experiment=fig_main" in message
    assert not (tmp_path / "out").exists()


def test_fig_motivation(tmp_path):
    for i, alpha in enumerate((0.0, 0.003, 0.01, 0.03)):
        make_run(tmp_path / "sweep" / str(i), {"alpha": alpha}, {"dynk": DYNK, "topk": TOPK})
    script("fig_motivation").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path)])
    assert outputs(tmp_path, "fig_motivation")
    (tmp_path / "sweep" / "3" / "points.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"alpha=0.03 \(alpha=0.03, rule=dynk\)"):
        script("fig_motivation").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path)])


def test_fig_expert_use(tmp_path):
    for i, alpha in enumerate((0.0, DEFAULT_ALPHA)):
        make_run(tmp_path / "sweep" / str(i), {"alpha": alpha}, {"dynk": DYNK})
    script("fig_expert_use").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path), "--tau", "0.3"])
    assert outputs(tmp_path, "fig_expert_use")
    with pytest.raises(SystemExit, match=r"has no tau=0.4"):
        script("fig_expert_use").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path), "--tau", "0.4"])


def test_fig_patch_map(tmp_path):
    make_run(tmp_path / "sweep" / "0", {}, {"dynk": DYNK}, patches=True)
    script("fig_patch_map").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path), "--tau", "0.3"])
    assert outputs(tmp_path, "fig_patch_map")
    (tmp_path / "sweep" / "0" / "patch_maps.npz").unlink()
    with pytest.raises(SystemExit, match="no patch_maps.npz"):
        script("fig_patch_map").main(["--results", str(tmp_path / "sweep"), "--out", str(tmp_path)])


ABLATION_RUNS = {
    "phases": [{"alpha": 0.0, "router": "moefication", "rule": "topk"},
               {"alpha": DEFAULT_ALPHA, "router": "moefication", "rule": "topk"},
               {"alpha": DEFAULT_ALPHA, "router": "regression", "rule": "topk"},
               {"alpha": DEFAULT_ALPHA, "router": "regression", "rule": "dynk"}],
    "alpha": [{"alpha": a, "rule": "dynk"} for a in (0.0, 0.003, 0.01, 0.03)],
    "expert_size": [{"num_experts": e, "rule": "dynk"} for e in (32, 64, 128, 256)],
    "activation": [{"activation": a, "rule": "dynk"} for a in ("relu", "keep")],
    "attention": [{"attention": a, "rule": "dynk"} for a in (False, True)],
}


@pytest.mark.parametrize("ablation", sorted(ABLATION_RUNS))
def test_fig_ablations(ablation, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for i, want in enumerate(ABLATION_RUNS[ablation]):
        setting = {k: v for k, v in want.items() if k != "rule"}
        make_run(sweep / str(i), setting, {want["rule"]: DYNK if want["rule"] == "dynk" else TOPK})
    fig = script("fig_ablations")
    fig.main([ablation, "--results", str(sweep), "--out", str(tmp_path)])
    assert outputs(tmp_path, f"fig_ablation_{ablation}")
    # dense 0.9: within 1 point only tau 0 (rel_cost 1.0), for every run
    summary = json.loads((tmp_path / f"fig_ablation_{ablation}.json").read_text())
    assert [arm["cheapest_within"]["rel_cost"]["mean"] for arm in summary.values()] == [1.0] * len(ABLATION_RUNS[ablation])
    assert capsys.readouterr().out.count("within 0.01 of dense, chosen on validation (1 seed(s), test): 1.000 at 0.9000") \
        == len(ABLATION_RUNS[ablation])
    (sweep / "0" / "points.jsonl").unlink()
    with pytest.raises(SystemExit, match=f"fig_ablation_{ablation}: missing runs"):
        fig.main([ablation, "--results", str(sweep), "--out", str(tmp_path)])


def test_select_needs_stats_when_asked(tmp_path):
    run = make_run(tmp_path / "0", {}, {"dynk": DYNK})
    (run / "stats.json").unlink()
    runs = load_runs(tmp_path)
    assert select(runs, {"a": {"rule": "dynk"}}, "fig", "cmd")["a"].dir == run
    with pytest.raises(MissingRuns, match="fig: missing runs: a"):
        select(runs, {"a": {"rule": "dynk"}}, "fig", "cmd", stats=True)


def test_fig_wallclock(tmp_path):
    rows = [{"size": "minilm", "experts": 128, "expert_size": 12, "fraction": f, "moe_ms": 1.0, "dense_ms": 2.0,
             "flop_ratio": f, "time_ratio": 2 * f} for f in (0.1, 0.5, 1.0)]
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"threads": 2, "device": "cpu", "repeats": 3, "layer": rows}))
    script("fig_wallclock").main(["--input", str(bench), "--out", str(tmp_path)])
    assert outputs(tmp_path, "fig_wallclock")
    with pytest.raises(SystemExit, match="bench_wallclock.py"):
        script("fig_wallclock").main(["--input", str(tmp_path / "none.json"), "--out", str(tmp_path)])


def test_choose_on_validation_ignores_test(tmp_path):
    """Two alphas, two seeds: validation favours 0.01 (within 1 point at rel_cost 0.5), test would favour
    0.001 (within at 0.3); the choice and its score come from validation only."""
    sweep = tmp_path / "sweep"
    curves = {0.001: ([(0.0, 1.0, 0.9), (0.3, 0.5, 0.9), (1.0, 0.3, 0.9)], [(1.0, 0.9), (0.5, 0.85), (0.3, 0.7)]),
              0.01: ([(0.0, 1.0, 0.9), (0.3, 0.5, 0.8), (1.0, 0.3, 0.7)], [(1.0, 0.9), (0.5, 0.89), (0.3, 0.7)])}
    job = 0
    for seed in (0, 1):
        for alpha, (test, val) in curves.items():
            run = make_run(sweep / str(job), {"alpha": alpha, "seed": seed}, {"dynk": test}, val={"dynk": val})
            (run / ".hydra").mkdir()
            (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nsparsity: {{alpha: {alpha}, epochs: 4}}\n")
            job += 1
    (sweep / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      seed: 0,1\n"
                                         "      sparsity.alpha: 0.001,0.01\n")
    script("choose_on_validation").main(["--results", str(sweep), "--out", str(tmp_path / "figures"),
                                         "--name", "choose_sparsity"])
    summary = json.loads((tmp_path / "figures" / "choose_sparsity.json").read_text())
    assert summary["keys"] == ["sparsity.alpha"] and summary["chosen"] == {"sparsity.alpha": 0.01}
    assert [(s["sparsity.alpha"], s["val_rel_cost"]) for s in summary["settings"]] == [(0.01, 0.5), (0.001, 1.0)]
    reported = summary["chosen_test"]["per_seed"]
    assert list(reported) == ["0", "1"] and all(r["rel_cost"] == 0.5 and r["value"] == 0.8 for r in reported.values())
    render = script("render_readme")
    readme = "\n".join(render.chosen_settings(tmp_path))  # the README's account of it
    assert "| 0.01 | 0, 1 | 0.500 (0.500, 0.500) |\n| 0.001 | 0, 1 | 1.000 (1.000, 1.000) |" in readme
    uses = ("The built-in default uses it." if default_alpha() == 0.01
            else f"The built-in default still sets `sparsity.alpha={default_alpha():g}`")
    assert f"Chosen: `sparsity.alpha=0.01`. Its score is 0.500 below the next setting's. {uses}" in readme
    assert "Its chosen points on the test split: rel_cost 0.500" in readme

    # the same choice for minilm_carer, against the alpha it sets now: said plainly where they differ
    carer_alpha, = render.preset_values("minilm_carer", ["sparsity.alpha"])
    summary["chosen"] = {"sparsity.alpha": 3 * carer_alpha}
    (tmp_path / "figures" / "choose_sparsity_carer.json").write_text(json.dumps(summary))
    readme = "\n".join(render.chosen_settings(tmp_path))
    assert "`experiment=minilm_carer`'s `sparsity.alpha` was chosen on validation: `python run.py -m " \
           "experiment=choose_sparsity_carer data.path=... && python experiments/choose_on_validation.py " \
           f"--results {sweep} --name choose_sparsity`" in readme
    assert f"`experiment=minilm_carer` still sets `sparsity.alpha={carer_alpha:g}`: it has not been moved" in readme


def test_fig_main_headlines_the_default_alpha(tmp_path):
    """Runs at an earlier alpha found first: the headline is still the default's alpha, the other is
    reported beside it (by_alpha)."""
    make_run(tmp_path / "main" / "0", {"alpha": 0.003}, {"dynk": DYNK})
    make_run(tmp_path / "main" / "1", {"alpha": DEFAULT_ALPHA}, {"dynk": DYNK})
    make_run(tmp_path / "main" / "2", {"method": "moefication", "router": "moefication", "alpha": 0.0},
             {"topk": TOPK})
    script("fig_main").main(["--results", str(tmp_path / "main"), "--out", str(tmp_path / "out"),
                             "--resamples", "50"])
    summary = json.loads((tmp_path / "out" / "fig_main.json").read_text())["tiny/toy"]
    assert summary["alpha"] == DEFAULT_ALPHA != 0.003 and set(summary["by_alpha"]) == {"0.003", f"{DEFAULT_ALPHA:g}"}


def test_fig_curve_records_one_run_and_chooses_on_validation(tmp_path):
    """Test numbers would pick tau 1 (within 1 point at rel_cost 0.3); validation picks tau 0.3 (rel_cost
    0.5): the record's cheapest point is validation's, reported with its test numbers."""
    run = make_run(tmp_path / "run", {}, {"dynk": [(0.0, 1.0, 0.9), (0.3, 0.5, 0.85), (1.0, 0.3, 0.895)]},
                   val={"dynk": [(1.0, 0.9), (0.5, 0.895), (0.3, 0.7)]})
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- experiment=gemma3_bbc\n- logger=none\n")
    out = tmp_path / "figures"
    script("fig_curve").main([str(run), "--out", str(out)])
    rec = json.loads((out / "curve_run.json").read_text())
    assert outputs(out, "curve_run")
    assert rec["command"] == f"python run.py experiment=gemma3_bbc logger=none hydra.run.dir={run.as_posix()}"
    assert rec["split"] == "test" and rec["chosen_on"] == "validation"
    assert [p["tau"] for p in rec["points"]] == [0.0, 0.3, 1.0]
    assert rec["cheapest"]["tau"] == 0.3 and rec["cheapest"]["value"] == 0.85
    with pytest.raises(SystemExit, match="has no points.jsonl"):
        script("fig_curve").main([str(tmp_path / "unfinished")])


def test_choose_on_validation_reads_several_sweeps_as_one(tmp_path):
    """A stopped sweep's missing job named again into another directory counts with the first; the
    same setting and seed twice is refused, not silently dropped."""
    def job(path: Path, alpha: float, seed: int, val_cost: float):
        run = make_run(path, {"alpha": alpha, "seed": seed}, {"dynk": [(0.0, 1.0, 0.9), (0.3, 0.5, 0.9)]},
                       val={"dynk": [(1.0, 0.9), (val_cost, 0.9)]})
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nsparsity: {{alpha: {alpha}}}\n")

    first, second = tmp_path / "sweep", tmp_path / "sweep_b"
    job(first / "0", 0.01, 0, 0.5)
    job(first / "1", 0.03, 0, 0.4)
    job(second / "0", 0.01, 1, 0.5)
    job(second / "1", 0.03, 1, 0.8)
    (first / "multirun.yaml").write_text("hydra:\n  sweeper:\n    params:\n      seed: 0,1\n      sparsity.alpha: 0.01,0.03\n")
    choose = script("choose_on_validation").main
    choose(["--results", str(first), str(second), "--out", str(tmp_path / "figures"), "--name", "both"])
    summary = json.loads((tmp_path / "figures" / "both.json").read_text())
    assert summary["chosen"] == {"sparsity.alpha": 0.01}  # 0.5 on both seeds against 0.4 and 0.8
    assert [s["seeds"] for s in summary["settings"]] == [[0, 1], [0, 1]]
    assert summary["command"] == f"python experiments/choose_on_validation.py --results {first} {second} --name both"
    said = "\n".join(script("render_readme").chosen_setting(summary, "figures/both.json", None, "sweep", "The default's"))
    assert ("Its score is 0.100 below the next setting's; their per-seed scores overlap (0.500-0.500 against "
            "0.400-0.800), so these seeds do not separate the two.") in said
    job(second / "2", 0.01, 0, 0.3)  # seed 0 of alpha 0.01 again
    with pytest.raises(SystemExit, match="are the same setting and seed"):
        choose(["--results", str(first), str(second), "--out", str(tmp_path / "figures")])
