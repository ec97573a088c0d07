"""The whole pipeline on the smoke config: phases, reuse of artifacts, the results contract."""
import subprocess
import sys
from pathlib import Path

import pytest

from d2dmoe import pipeline
from d2dmoe.results import POINT_KEYS, read_points

ROOT = Path(__file__).resolve().parents[1]


def artifact_dirs(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name != "data":
            phase = d.name.rsplit("-", 1)[0]
            counts[phase] = counts.get(phase, 0) + 1
    return counts


def test_pipeline_runs_every_phase_then_reuses_them(smoke_cfg, monkeypatch):
    points = pipeline.run(smoke_cfg)
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
    again = pipeline.run(smoke_cfg)
    assert again[1] == {**moe[1]}  # same artifacts, same numbers
    smoke_cfg.experts.impl = "masked"  # execution only: retrains nothing, same points
    masked = pipeline.run(smoke_cfg)
    assert [(p["value"], p["macs"]) for p in masked] == [(p["value"], p["macs"]) for p in again]
    assert artifact_dirs(root) == {"dense": 1, "sparsify": 1, "split": 1, "routers": 1}


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

    # top-k on the same routers: nothing retrains, a new kind of point comes out
    result = run_py("experiment=smoke", "routing=topk", "routing.ks=[1,2,8]", f"artifacts_dir={art}",
                    f"hydra.run.dir={tmp_path / 'topk'}")
    assert artifact_dirs(art) == {"dense": 1, "sparsify": 2, "split": 2, "routers": 2}
    points = read_points(tmp_path / "topk" / "points.jsonl")
    assert [(p["rule"], p["k"]) for p in points] == [("dense", None), ("topk", 1), ("topk", 2), ("topk", 8)]
    assert points[-1]["experts_per_token"] == 8
    assert "rel_cost" in result.stdout and "topk" in result.stdout  # the printed table


def test_bad_value_fails_before_any_compute(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "experiment=smoke", "routing.taus=[2.0]",
                             f"artifacts_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'out'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "routing.taus: tau=2.0 is outside [0, 1]" in result.stderr
    assert not any(tmp_path.glob("dense-*"))


@pytest.mark.parametrize("model", ["tiny_gpt2", "tiny_llama"])
def test_language_model_pipeline(model, tmp_path):
    """Every phase on a tiny LM trained from a config, with a BPE tokenizer trained on the BBC text."""
    import math

    from tests.conftest import compose_config

    cfg = compose_config(["experiment=smoke", f"model={model}", "data=bbc_news_lm"], artifacts_dir=tmp_path)
    points = pipeline.run(cfg)
    assert [p["method"] for p in points] == ["dense"] + ["d2dmoe"] * 3
    assert all(p["metric"] == "loss" and p["perplexity"] == pytest.approx(math.exp(p["value"])) for p in points)
    dense, all_experts, *_ = points
    assert math.log(512) * 0.5 < dense["value"] < math.log(512) * 1.5  # a fresh 512-token LM: about ln V
    assert all_experts["experts_per_token"] == 8
    costs = [p["rel_cost"] for p in points[1:]]
    assert costs == sorted(costs, reverse=True)
    assert list(tmp_path.glob("data/bpe-512-*")), "the tokenizer was trained and cached"
    again = pipeline.run(cfg)  # every phase loaded back from its artifact into a fresh model
    assert [(p["value"], p["macs"]) for p in again] == [(p["value"], p["macs"]) for p in points]


def test_gpt2_owt_loads_local_weights_and_a_local_text_file(tmp_path):
    """The paper's GPT-2 experiment through its real loading code (`from_pretrained`, `load_dataset`),
    pointed at a GPT-2 saved locally and a local text file instead of the hub."""
    import math

    from transformers import GPT2Config, GPT2LMHeadModel

    from d2dmoe.tokenizer import train_bpe
    from tests.conftest import compose_config

    text = tmp_path / "owt.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7} times." * 3
                              for i in range(400)))
    tok = train_bpe(text.read_text().splitlines(), tmp_path / "tok", vocab_size=300)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
                               vocab_size=len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = compose_config(["experiment=gpt2_owt", f"model.path={model_dir}", f"data.path={text}",
                          "data.max_length=32", "data.val_fraction=0.05", "data.test_fraction=0.05",
                          "data.limit_train=64", "data.limit_eval=16", "sparsity.max_steps=3",
                          "routing.router.max_steps=3", "routing.taus=[0,1]", "logger=none", "offline=true",
                          "trainer.enable_progress_bar=false"], artifacts_dir=tmp_path / "artifacts")
    points = pipeline.run(cfg)
    assert [p["method"] for p in points] == ["dense", "d2dmoe", "d2dmoe"]
    assert points[0]["metric"] == "loss" and math.isfinite(points[0]["value"])
    assert points[0]["num_experts"] == 16  # expert_size 4 of d_ff 64
    assert points[1]["experts_per_token"] == 16
