"""The whole pipeline on the smoke config: phases, reuse of artifacts, the results contract."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2dmoe import pipeline
from d2dmoe.results import POINT_KEYS, read_points, read_stats

ROOT = Path(__file__).resolve().parents[1]


def artifact_dirs(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name != "data":
            phase = d.name.rsplit("-", 1)[0]
            counts[phase] = counts.get(phase, 0) + 1
    return counts


def test_pipeline_runs_every_phase_then_reuses_them(smoke_cfg, monkeypatch):
    points = pipeline.run(smoke_cfg).points
    assert [p["method"] for p in points] == ["dense"] + ["d2dmoe"] * 3
    assert [p["tau"] for p in points[1:]] == [0.0, 0.5, 1.0]
    dense, *moe = points
    assert dense["rel_cost"] == 1.0 and dense["rule"] == "dense"
    assert all(set(POINT_KEYS) <= set(p) for p in points)
    assert all(0 <= p["value"] <= 1 for p in points)
    costs = [p["rel_cost"] for p in moe]
    assert costs == sorted(costs, reverse=True)  # fewer experts as tau grows
    assert moe[0]["experts_per_token"] == 8 and moe[-1]["experts_per_token"] == pytest.approx(1.0, abs=0.05)
    root = Path(smoke_cfg.artifacts_dir)
    assert artifact_dirs(root) == {"dense": 1, "sparsify": 1, "split": 1, "routers": 1}

    def no_training(*args, **kwargs):
        raise AssertionError("a phase was recomputed")

    for name in ("train_dense", "sparsify", "split", "train_routers"):
        monkeypatch.setattr(pipeline, name, no_training)
    smoke_cfg.routing.taus = [0.5, 0.9]  # evaluation-only: retrains nothing
    again = pipeline.run(smoke_cfg).points
    assert again[1] == {**moe[1]}  # same artifacts, same numbers
    smoke_cfg.experts.impl = "masked"  # execution only: retrains nothing, same points
    masked = pipeline.run(smoke_cfg).points
    assert [(p["value"], p["macs"]) for p in masked] == [(p["value"], p["macs"]) for p in again]
    smoke_cfg.routing.rule = "both"  # dynamic-k and top-k on the same routers: retrains nothing
    both = pipeline.run(smoke_cfg).points
    assert [(p["rule"], p["tau"], p["k"]) for p in both[1:]] == [
        ("dynk", 0.5, None), ("dynk", 0.9, None), ("topk", None, 1), ("topk", None, 2), ("topk", None, 8)]
    assert both[1] == again[1] and both[-1]["experts_per_token"] == 8
    assert artifact_dirs(root) == {"dense": 1, "sparsify": 1, "split": 1, "routers": 1}


def test_points_are_measured_on_both_splits_and_examples_add_up_to_them(smoke_cfg):
    """Each point's test and validation numbers are what its per-example sums give; the dense model
    agrees with itself everywhere, and a converted point's agreement is the share of examples whose
    prediction is the dense model's."""
    results = pipeline.run(smoke_cfg)
    points, examples = results.points, results.examples
    assert set(examples) == {"test", "validation"}
    for split, prefix in (("test", ""), ("validation", "val_")):
        e = examples[split]
        assert e["sum"].shape == (len(points), 32)  # limit_eval: 32 examples per split
        for i, p in enumerate(points):
            assert p[f"{prefix}value"] == pytest.approx(e["sum"][i].sum() / e["count"][i].sum())
            assert p[f"{prefix}rel_cost"] == pytest.approx(e["macs"][i].sum() / e["dense_macs"][i].sum())
            assert p[f"{prefix}agreement"] == pytest.approx(e["fidelity_sum"][i].mean())
        assert points[0][f"{prefix}agreement"] == 1.0
        # the examples come in the same order for every point: the dense model's MACs are the same
        assert (e["dense_macs"] == e["dense_macs"][0]).all()


def test_a_retrained_dense_model_retrains_what_was_made_from_the_old_one(smoke_cfg):
    pipeline.run(smoke_cfg)
    arts = pipeline.artifacts(smoke_cfg)
    shutil.rmtree(arts["dense"].dir)  # the same config trains it again, under the same name
    pipeline.run(smoke_cfg)
    root = Path(smoke_cfg.artifacts_dir)
    assert artifact_dirs(root) == {"dense": 1, "sparsify": 1, "split": 1, "routers": 1}
    assert sorted(d.name.rsplit("-", 3)[0] for d in (root / ".stale").iterdir()) == \
        [arts[p].key for p in ("routers", "sparsify", "split")]
    dense_id = arts["dense"].lineage()["id"]
    assert all(arts[p].lineage()["made_from"][arts["dense"].key] == dense_id for p in ("sparsify", "split", "routers"))


def run_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_run_py_sweep_writes_results_and_shares_upstream_phases(tmp_path):
    art = tmp_path / "artifacts"
    run_py("-m", "experiment=smoke", "sparsity.alpha=0,0.01", "logger=wandb", f"artifacts_dir={art}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert artifact_dirs(art) == {"dense": 1, "sparsify": 2, "split": 2, "routers": 2}
    for job, alpha in (("0", 0.0), ("1", 0.01)):
        out = tmp_path / "sweep" / job
        points = read_points(out / "points.jsonl")
        assert {p["alpha"] for p in points} == {alpha}
        assert points[0]["method"] == "dense" and points[0]["metric"] == "accuracy"
        assert (out / "pareto.png").stat().st_size > 10_000
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, "one W&B run per job"
        logged = b"".join(f.read_bytes() for f in runs[0].glob("*.wandb"))
        for table in (b"points", b"expert_use", b"activation_sparsity"):
            assert table in logged

    stats = read_stats(tmp_path / "sweep" / "1")
    assert len(stats["activation"]) == 2  # tiny BERT: 2 layers
    assert [q["tau"] for q in stats["points"]] == [0.0, 0.5, 1.0]
    # what the dense training did, from its artifact: the smoke preset's 4 steps are one epoch, which
    # the cap (max_steps) ends before the patience could
    record = stats["dense_training"]
    assert (record["epochs_run"], record["best_epoch"], record["stopped_by"]) == (1, 0, "cap")
    assert record["val_history"] == [pytest.approx(record["best_val_accuracy"])]
    for q, p in zip(stats["points"], points[1:]):
        assert [len(layer["experts_hist"]) for layer in q["layers"]] == [9, 9]  # 0..8 experts
        mean = sum(layer["experts_per_token"] for layer in q["layers"]) / 2
        assert mean == pytest.approx(p["experts_per_token"])

    # MoEfication: alpha 0 reuses the alpha=0 job's sparsify and split; only its routers train
    result = run_py("experiment=smoke", "method=moefication", f"artifacts_dir={art}",
                    f"hydra.run.dir={tmp_path / 'moefication'}")
    assert artifact_dirs(art) == {"dense": 1, "sparsify": 2, "split": 2, "routers": 3}
    points = read_points(tmp_path / "moefication" / "points.jsonl")
    assert [(p["method"], p["rule"], p["k"]) for p in points] == [
        ("dense", "dense", None), ("moefication", "topk", 1), ("moefication", "topk", 2), ("moefication", "topk", 8)]
    assert {p["router"] for p in points} == {"moefication"} and points[1]["alpha"] == 0.0
    assert points[-1]["experts_per_token"] == 8
    assert "rel_cost" in result.stdout and "topk" in result.stdout  # the printed table


def test_agreement_is_the_share_of_examples_predicted_as_the_dense_model_does(smoke_cfg):
    """Against predictions computed here, batch by batch, from the two models themselves."""
    import copy

    import torch

    from d2dmoe.moe import DynamicKGate, set_gate
    from d2dmoe.phases.evaluate import Evaluation, Reference

    ctx, _, moe = pipeline.convert(smoke_cfg)
    set_gate(moe, DynamicKGate(1.0))
    moe.eval()
    # the tiny model predicts nearly one class everywhere; as the reference, the same model with its top
    # class's bias lowered by the median top-two gap predicts the runner-up on about half the examples
    with torch.no_grad():
        logits = torch.cat([ctx.adapter.forward(moe, b) for b in ctx.data.test_dataloader()])
    top2 = logits.topk(2, -1).values
    dense = copy.deepcopy(moe)
    with torch.no_grad():
        dense.classifier.bias[logits.argmax(-1).mode().values] -= (top2[:, 0] - top2[:, 1]).median()
    ev = ctx.test(Evaluation(moe, ctx.adapter, ctx.dims, reference=Reference(dense, ctx.adapter)))
    same = []
    with torch.no_grad():
        for batch in ctx.data.test_dataloader():
            same += (ctx.adapter.forward(moe, batch).argmax(-1) == ctx.adapter.forward(dense, batch).argmax(-1)).tolist()
    assert ev.examples["fidelity_sum"].tolist() == [float(s) for s in same]
    assert ev.fidelity == pytest.approx(sum(same) / len(same)) and 0 < ev.fidelity < 1
    # the reference's outputs are kept per split and batch: validation's batch 0 is not test's
    reference = Reference(dense, ctx.adapter)
    test, val = next(iter(ctx.data.test_dataloader())), next(iter(ctx.data.val_dataloader()))
    reference.logits("test", 0, test)
    with torch.no_grad():
        assert torch.equal(reference.logits("validation", 0, val), ctx.adapter.forward(dense, val))
