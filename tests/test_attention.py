"""Attention projections as MLPs, then MoE layers (attention.convert): the replacement's size, exact
equivalences along the way, the cost against FlopCounterMode, distillation, configs and artifacts."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe import pipeline
from d2dmoe.attention import (
    Distill,
    distill_modules,
    finish_distillation,
    install_projection_mlps,
    projection_hidden,
    projection_mlp,
    projection_slots,
)
from d2dmoe.cost import dense_macs, moe_model_macs
from d2dmoe.models import BertAdapter, GPT2Adapter, VitAdapter
from d2dmoe.moe import FFN, AllExperts, ffn_layers, moe_layers, set_gate
from d2dmoe.phases.attention import AttentionDistillation
from d2dmoe.phases.split import split_model
from d2dmoe.validate import ConfigError, check_config, check_model
from tests.conftest import compose_config

VOCAB = 300


def tiny(family: str, attn: str = "eager"):
    """A tiny model of each family that converts (d = 32: projection MLPs of 16 neurons)."""
    if family == "bert":
        cfg = compose_config(["model=tiny_bert"]).model
        return BertAdapter(cfg.name, cfg.path, pretrained=False, attn_implementation=attn,
                           config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                   "intermediate_size": 64})
    if family == "gpt2":
        return GPT2Adapter("tiny_gpt2", path=None, pretrained=False, attn_implementation=attn,
                           config={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 64,
                                   "vocab_size": VOCAB})
    return VitAdapter("tiny_vit", path="vit_tiny_patch16_224", pretrained=False, attn_implementation=attn,
                      config={"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2,
                              "num_heads": 2, "mlp_ratio": 2})


def batch_for(family: str, lengths=(9, 5)) -> dict:
    torch.manual_seed(0)
    if family == "vit":
        return {"pixel_values": torch.randn(len(lengths), 1, 8, 8), "labels": torch.arange(len(lengths))}
    T = max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(5, VOCAB, (len(lengths), T)) * mask, "attention_mask": mask,
            "labels": torch.arange(len(lengths))}


def build(family: str, adapter):
    return adapter.build(None if family == "gpt2" else 3).eval()


def counted_macs(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("d", [32, 128, 384, 768, 1024])
def test_the_mlp_has_the_parameters_and_macs_of_the_projection(d):
    proj = nn.Linear(d, d)
    mlp = projection_mlp(proj)
    h = projection_hidden(d)
    assert h == d // 2 and mlp.w1.out_features == h and mlp.kind == "attention"
    x = torch.randn(3, d)
    # MACs, counted by torch: d*h + h*d for the MLP against d*d for the projection
    assert counted_macs(mlp, x) == counted_macs(proj, x) == 3 * d * d
    # parameters: the weights and hidden biases h (2d + 1) are the closest h gets to the projection's d^2 + d;
    # the MLP's output bias (d) is what remains
    params = sum(p.numel() for p in mlp.parameters())
    assert params - d == h * (2 * d + 1)
    assert abs(h * (2 * d + 1) - (d * d + d)) <= (2 * d + 1) / 2


@pytest.mark.parametrize("d", [8, 32, 33])
def test_svd_init_is_the_best_low_rank_approximation(d):
    """Before training, the svd-initialised MLP computes W_r x + b, W_r the rank-h/2 truncated SVD of W."""
    torch.manual_seed(0)
    proj = nn.Linear(d, d)
    mlp = projection_mlp(proj, "svd")
    r = projection_hidden(d) // 2
    u, s, vh = torch.linalg.svd(proj.weight.detach().double())
    w_r = (u[:, :r] * s[:r]) @ vh[:r]
    x = torch.randn(20, d)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x).double(), x.double() @ w_r.T + proj.bias.double(), rtol=1e-4, atol=1e-5)
        if r < d:  # strictly worse than the projection: the rest is for distillation to recover
            assert (mlp(x) - proj(x)).abs().max() > 1e-3


@pytest.mark.parametrize("width", [0.5, 2, 3])
def test_a_wider_mlp_costs_width_times_the_projection(width):
    d = 64
    proj = nn.Linear(d, d)
    mlp = projection_mlp(proj, width=width)
    assert mlp.w1.out_features == projection_hidden(d, width) == width * d // 2
    x = torch.randn(3, d)
    assert counted_macs(mlp, x) == width * counted_macs(proj, x)


@pytest.mark.parametrize("width", [4, 5])
def test_from_twice_the_model_width_the_svd_start_is_exact_and_every_neuron_learns(width):
    """At h >= 2d the rank-d 'approximation' is the projection itself; the neurons past 2d leave the
    output unchanged (zero output weights) but are not dead: their output weights get gradients."""
    torch.manual_seed(0)
    d = 16
    proj = nn.Linear(d, d)
    mlp = projection_mlp(proj, "svd", width)
    h = mlp.w1.out_features
    assert h == width * d // 2 and h >= 2 * d
    x = torch.randn(20, d)
    torch.testing.assert_close(mlp(x), proj(x), rtol=1e-4, atol=1e-5)
    mlp(x).pow(2).sum().backward()
    grad = mlp.w2.weight.grad[:, 2 * d:]  # [d, h - 2d]
    assert (h > 2 * d) == bool(grad.abs().sum(0).gt(0).any())


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_unfused_projections_and_distill_wrappers_leave_the_model_unchanged(family):
    adapter = tiny(family, attn="sdpa")
    model = build(family, adapter)
    batch = batch_for(family)
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        slots = projection_slots(adapter, model)  # cuts GPT-2's c_attn and timm's qkv into Q, K, V
        assert len(slots) == 4 * 2
        assert all(isinstance(getattr(p, a), nn.Linear) and getattr(p, a).weight.shape == (32, 32) for p, a in slots)
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-5, atol=1e-6)
        install_projection_mlps(adapter, model, distill=True)
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-5, atol=1e-6)
    distills = distill_modules(model)
    assert len(distills) == 8
    tokens = adapter.token_mask(batch).shape
    assert all(m.error.shape == tokens and m.power.shape == tokens and (m.error > 0).all() for m in distills)
    finish_distillation(adapter, model)
    assert not distill_modules(model) and len(ffn_layers(model, "attention")) == 8


def mlp_model(family: str, adapter, width: float = 1.0):
    """Projections as (random) MLPs, FFNs with ReLU: the model the sparsify phase produces."""
    torch.manual_seed(1)
    model = install_projection_mlps(adapter, build(family, adapter), width=width)
    return adapter.install_ffns(model, nn.ReLU()).eval()


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_moe_with_every_expert_equals_the_mlp_model(family):
    adapter = tiny(family, attn="sdpa")
    model = mlp_model(family, adapter)
    batch = batch_for(family)
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1, attention=(4, 8))
        assert not ffn_layers(model)
        assert [len(moe_layers(model, k)) for k in ("ffn", "attention")] == [2, 8]
        assert {(m.num_experts, m.expert_size) for m in moe_layers(model, "attention")} == {(4, 4)}
        set_gate(model, AllExperts())
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_cost_of_a_converted_model_with_every_expert_matches_flop_counter(family):
    """Every projection and FFN an MoE, every expert run (masked: all experts computed): the
    analytic count, with the projections moved out of fixed(T), equals FlopCounterMode / 2."""
    adapter = tiny(family)
    model = mlp_model(family, adapter)
    dims = adapter.dims(None if family == "gpt2" else 3)
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1, attention=(4, 8))
    for lengths in ([7], [12]):  # one sequence (or one image) each
        batch = batch_for(family, lengths)
        counted = counted_macs(adapter.forward, model, batch)  # also records the gate masks
        analytic = moe_model_macs(adapter, model, adapter.token_mask(batch), dims)
        assert analytic.item() == pytest.approx(counted, rel=1e-9)
        # and the projections' share of the dense cost is what left fixed(T)
        tokens = adapter.token_mask(batch).sum(-1)
        assert adapter.projection_macs(tokens, dims).item() == 4 * 2 * tokens.item() * 32 * 32
        assert dense_macs(adapter, tokens, dims).item() > adapter.projection_macs(tokens, dims).item()


ATTENTION_SMOKE = ["experiment=smoke", "attention.convert=true", "attention.num_experts=4", "attention.router_hidden=8",
                   "attention.epochs=4", "attention.lr=1e-2"]


def attention_cfg(tmp_path, *overrides):
    return compose_config([*ATTENTION_SMOKE, *overrides], artifacts_dir=tmp_path / "artifacts")


def test_pipeline_with_attention_conversion(tmp_path, monkeypatch):
    cfg = attention_cfg(tmp_path)
    results = pipeline.run(cfg)
    points = results.points
    # activation sparsity of the FFNs (2 blocks) and, apart, of the projections' MLPs (Q, K, V, O each)
    assert [len(results.stats[k]) for k in ("activation", "attention_activation")] == [2, 8]
    assert all(0 <= a["zero_fraction"] <= 1 for a in results.stats["attention_activation"])
    dense, *moe = points
    assert dense["attention"] is True and dense["attention_experts_per_token"] is None
    assert moe[0]["attention_experts_per_token"] == 4  # tau 0: every expert of every projection
    assert moe[-1]["attention_experts_per_token"] == pytest.approx(1.0, abs=0.1)
    assert moe[0]["experts_per_token"] == 8  # FFN layers only
    names = sorted(p.name.split("-")[0] for p in Path(cfg.artifacts_dir).glob("*-*") if p.is_dir())
    assert names == ["attention", "dense", "routers", "sparsify", "split"]
    arts = pipeline.artifacts(cfg)
    assert arts["sparsify"].spec["upstream"] == arts["attention"].key

    # distillation learned: below the error of fresh MLPs on the same data
    trained = json.loads((arts["attention"].dir / "info.json").read_text())["attention/val_relative_error"]
    ctx = pipeline.build_context(cfg)
    fresh = install_projection_mlps(ctx.adapter, pipeline.obtain(ctx, arts["dense"], "dense", None), distill=True)
    batch = next(iter(ctx.data.val_dataloader()))
    with torch.no_grad():
        _, before = AttentionDistillation(fresh, ctx.adapter).losses(batch)
    assert trained < 0.5 * before.item()

    # a second run reuses every phase, the distillation included
    def no_training(*args, **kwargs):
        raise AssertionError("a phase was recomputed")

    for name in ("train_dense", "distill_attention", "sparsify", "split", "train_routers"):
        monkeypatch.setattr(pipeline, name, no_training)
    again = pipeline.run(attention_cfg(tmp_path)).points
    assert [(p["value"], p["macs"]) for p in again] == [(p["value"], p["macs"]) for p in points]

    # experiments/attention_diagnosis.py on the same artifacts: with every expert on, the oracle and
    # the learned routers give the same model; the oracle scores are the true expert norms
    script = Path(__file__).resolve().parents[1] / "experiments" / "attention_diagnosis.py"
    spec = importlib.util.spec_from_file_location("attention_diagnosis", script)  # experiments/ is no package
    attention_diagnosis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attention_diagnosis)
    monkeypatch.chdir(tmp_path)
    assert attention_diagnosis.main([*ATTENTION_SMOKE, f"artifacts_dir={tmp_path / 'artifacts'}"]) == 0
    rows = json.loads((tmp_path / "figures/attention_diagnosis.json").read_text())["rows"]
    oracle = {r["attention_tau"]: r for r in rows if r["router"] == "oracle"}
    learned = {r["attention_tau"]: r for r in rows if r["router"] == "learned" and r["ffn_tau"] == 0}
    assert oracle.keys() == learned.keys() and oracle[0.0] == {**learned[0.0], "router": "oracle"}
    moe = moe_layers(ctx.new_model("moe"), "attention")[0]
    x = torch.randn(5, moe.d)
    torch.testing.assert_close(attention_diagnosis.OracleScores(moe)(x), moe.expert_norms(x))


def test_without_conversion_the_artifact_chain_is_unchanged(tmp_path):
    """attention.convert=false adds nothing to any hash: existing artifacts keep their names."""
    plain = compose_config(["experiment=smoke"], artifacts_dir=tmp_path)
    arts = pipeline.artifacts(plain)
    assert "attention" not in arts and arts["sparsify"].spec["upstream"] == arts["dense"].key
    assert "attention" not in arts["split"].spec
    converted = pipeline.artifacts(compose_config(["experiment=smoke", "attention.convert=true"],
                                                  artifacts_dir=tmp_path))
    assert converted["dense"].key == arts["dense"].key and converted["sparsify"].key != arts["sparsify"].key
    more_experts = pipeline.artifacts(compose_config(["experiment=smoke", "attention.convert=true",
                                                      "attention.num_experts=8"], artifacts_dir=tmp_path))
    assert more_experts["sparsify"].key == converted["sparsify"].key  # the split's setting
    assert more_experts["split"].key != converted["split"].key
    # the sparsify settings for converted projections change nothing without them, and hash nothing
    assert not {"attention_scale", "attention_lr"} & set(arts["sparsify"].spec["sparsity"])
    for setting in ("sparsity.attention_lr=3e-4", "sparsity.attention_scale=8"):
        other = pipeline.artifacts(compose_config(["experiment=smoke", setting], artifacts_dir=tmp_path))
        assert other["sparsify"].key == arts["sparsify"].key
    # sparsity.attention_lr came later with the default 1e-3; null (the sparsify lr, what ran before it)
    # keeps the earlier converted artifacts' names
    before = pipeline.artifacts(compose_config(["experiment=smoke", "attention.convert=true",
                                                "sparsity.attention_lr=null"], artifacts_dir=tmp_path))
    assert "attention_lr" not in before["sparsify"].spec["sparsity"]
    assert converted["sparsify"].spec["sparsity"]["attention_lr"] == 1e-3
    # attention.width came later: at its default 1 it is not in the hash, so earlier distillations keep their names
    assert "width" not in converted["attention"].spec["attention"]
    wider = pipeline.artifacts(compose_config(["experiment=smoke", "attention.convert=true", "attention.width=2"],
                                              artifacts_dir=tmp_path))
    assert wider["attention"].spec["attention"]["width"] == 2 and wider["attention"].key != converted["attention"].key


def test_bad_attention_settings_fail_before_compute():
    cfg = compose_config(["experiment=smoke", "attention.convert=true", "attention.num_experts=5"])
    check_config(cfg)
    with pytest.raises(ConfigError, match="attention.num_experts.*does not divide.*16"):
        check_model(cfg, tiny("bert").dims(3))
    with pytest.raises(ConfigError, match="attention.convert.*llama"):
        check_config(compose_config(["model=tiny_llama", "attention.convert=true"]))
    with pytest.raises(ConfigError, match="attention.router_hidden"):
        check_config(compose_config(["attention.convert=true", "attention.router_hidden=0"]))
    with pytest.raises(ConfigError, match="attention.init"):
        check_config(compose_config(["attention.convert=true", "attention.init=zeros"]))
    with pytest.raises(ConfigError, match="attention.width"):
        check_config(compose_config(["attention.convert=true", "attention.width=0"]))
    wider = compose_config(["experiment=smoke", "attention.convert=true", "attention.num_experts=32",
                            "attention.width=2"])
    check_model(wider, tiny("bert").dims(3))  # 32 experts of 1 neuron in the 32 of width 2
    with pytest.raises(ConfigError, match="attention.num_experts.*does not divide.*attention.width=1.5"):
        check_model(compose_config(["experiment=smoke", "attention.convert=true", "attention.num_experts=16",
                                    "attention.width=1.5"]), tiny("bert").dims(3))
    with pytest.raises(ConfigError, match="sparsity.attention_scale"):
        check_config(compose_config(["attention.convert=true", "sparsity.attention_scale=-1"]))
    with pytest.raises(ConfigError, match="sparsity.attention_lr"):
        check_config(compose_config(["attention.convert=true", "sparsity.attention_lr=0"]))


def test_only_square_projections_convert():
    with pytest.raises(ValueError, match="square"):
        projection_mlp(nn.Linear(32, 16))


def test_distill_returns_the_original_output():
    proj = nn.Linear(8, 8)
    wrapper = Distill(proj, projection_mlp(proj))
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(wrapper(x), proj(x))
    expected = (wrapper.mlp(x) - proj(x)).pow(2).mean(-1)
    torch.testing.assert_close(wrapper.error, expected)
    assert isinstance(wrapper.mlp, FFN)


def test_penalty_adds_the_projection_mlps_as_their_own_group():
    """FFN layers and projection MLPs: each group averaged over its layers, the two terms added, so
    the FFNs' penalty is as strong as without converted projections."""
    from d2dmoe.sparsity import grouped_penalty, square_hoyer

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0]])
    ffn = [torch.rand(1, 3, 8), torch.rand(1, 3, 8)]
    attention = [torch.rand(1, 3, 4)]
    by_hand = sum(square_hoyer(a)[0, :2].mean() for a in ffn) / 2 + square_hoyer(attention[0])[0, :2].mean()
    torch.testing.assert_close(grouped_penalty([ffn, attention], mask, "hoyer"), by_hand)
    torch.testing.assert_close(grouped_penalty([ffn, []], mask, "hoyer"),
                               sum(square_hoyer(a)[0, :2].mean() for a in ffn) / 2)
    weighted = sum(square_hoyer(a)[0, :2].mean() for a in ffn) / 2 + 8 * square_hoyer(attention[0])[0, :2].mean()
    torch.testing.assert_close(grouped_penalty([ffn, attention], mask, "hoyer", [1.0, 8.0]), weighted)


def test_printed_table_shows_attention_columns_only_when_converted():
    from d2dmoe.results import table

    point = {"method": "d2dmoe", "rule": "dynk", "tau": 0.3, "k": None, "alpha": 0.01, "num_experts": 8,
             "experts_per_token": 2.0, "attention": False, "attention_experts_per_token": None, "macs": 10.0,
             "rel_cost": 0.5, "value": 0.9, "metric": "accuracy"}
    assert "attention" not in table([point]).splitlines()[0]
    converted = {**point, "attention": True, "attention_experts_per_token": 3.5}
    header, _, row = table([converted]).splitlines()
    assert "attention_experts_per_token" in header and "3.5" in row


def test_sparsify_can_give_the_projection_mlps_their_own_learning_rate():
    """sparsity.attention_lr: the projections' MLPs in one AdamW group at that rate, every other
    weight in the other at the sparsify lr; null keeps one group."""
    from types import SimpleNamespace

    from d2dmoe.phases.finetune import TaskTraining

    adapter = tiny("bert")
    model = mlp_model("bert", adapter)
    mlps = {id(p) for m in ffn_layers(model, "attention") for p in m.parameters()}
    module = TaskTraining(model, adapter, lr=5e-5, attention_lr=1e-3)
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    rest, projections = module.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in projections["params"]} == mlps and projections["initial_lr"] == 1e-3
    assert not mlps & {id(p) for p in rest["params"]} and rest["initial_lr"] == 5e-5
    assert len(rest["params"]) + len(projections["params"]) == len(list(model.parameters()))
    for one in (TaskTraining(model, adapter, lr=5e-5),  # no attention_lr
                TaskTraining(adapter.install_ffns(build("bert", adapter), nn.ReLU()), adapter, lr=5e-5,
                             attention_lr=1e-3)):  # no projection MLPs
        one.trainer = SimpleNamespace(estimated_stepping_batches=10)
        assert len(one.configure_optimizers()["optimizer"].param_groups) == 1
