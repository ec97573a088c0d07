"""experiments/bench_wallclock.py's whole-model timing on a tiny BERT: every execution runs through the
converted model, exactly k experts per token, and the row reports it."""
from pathlib import Path

import pytest
import torch

from experiments.bench_wallclock import cpu_name, synthetic_model_rows

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2,
        "vocab_size": 100}


def test_synthetic_model_rows_time_each_execution_at_the_fraction():
    rows = synthetic_model_rows(1, impls=("gather", "grouped", "masked", "auto"), fraction=0.25, size=TINY,
                                experts=(8,), batch=(2, 8))
    assert [r["impl"] for r in rows] == ["gather", "grouped", "masked", "auto"]
    for r in rows:
        assert (r["layers"], r["d"], r["d_ff"], r["experts"], r["fraction"]) == (2, 32, 128, 8, 0.25)
        assert r["experts_per_token"] == 2  # what the layers ran
        assert r["moe_ms"] > 0 and r["dense_ms"] > 0
        # from unrounded times: rounding moves the ratio of the rounded ones by a few percent, or 0.001
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["moe_ms"], rel=0.05, abs=1e-3)


def test_the_synthetic_model_runs_k_experts_per_token():
    from transformers import BertConfig, BertForSequenceClassification

    from d2dmoe.models.bert import BertAdapter
    from d2dmoe.moe import TopKGate, moe_layers, set_gate
    from d2dmoe.phases.split import moe_skeleton

    adapter = BertAdapter(name="synthetic", pretrained=False)
    model = adapter.install_ffns(BertForSequenceClassification(BertConfig(num_labels=2, **TINY))).eval()
    moe = moe_skeleton(adapter, model, 8, 16)
    set_gate(moe, TopKGate(2))
    with torch.no_grad():
        moe(input_ids=torch.randint(0, 100, (2, 8)))
    layers = moe_layers(moe)
    assert len(layers) == 2 and all(m.last_mask.sum(-1).eq(2).all() for m in layers)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo (Linux)")
def test_the_benchmark_names_the_processor_it_ran_on():
    """Wall times are the CPU's: the file says which one (its model name, as /proc/cpuinfo gives it)."""
    names = {line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")}
    if not names:
        pytest.skip("this /proc/cpuinfo names no model")
    assert cpu_name() in names


def test_the_whole_model_rows_time_float32_int8_and_bfloat16_on_the_same_points(tmp_path):
    """bench_wallclock's part 2 on the smoke preset: dense and every tau in each precision, the counted
    cost the same in all three (the routing is the float32 model's), times against dense float32."""
    from experiments.bench_wallclock import model_rows

    rows = model_rows(["experiment=smoke", f"artifacts_dir={tmp_path}"], repeats=1)
    taus = [row["tau"] for row in rows["model"]]
    assert taus[0] is None and len(taus) > 2
    assert rows["model"][0]["time_ratio"] == 1.0
    for key in ("model_int8", "model_bf16"):
        assert [row["tau"] for row in rows[key]] == taus
        assert [row["rel_cost"] for row in rows[key]] == [row["rel_cost"] for row in rows["model"]]
        assert all(0 <= row["accuracy"] <= 1 and row["ms"] > 0 for row in rows[key])
    assert set(rows["model_fastest"]) == {"float32", "int8", "bfloat16"}
