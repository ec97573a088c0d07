"""Converted models as folders: save -> load gives the same outputs for every family, without the
training config; the operating point moves at run time; the chosen tau meets the budget on held-out
data; broken folders give clear errors."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import d2dmoe
from d2dmoe import pipeline
from d2dmoe.attention import install_projection_mlps
from d2dmoe.export import CONFIG, WEIGHTS, ConvertedModel, UnsafeFolder, choose_tau, model_spec, save
from d2dmoe.moe import DynamicKGate, moe_layers, set_gate
from d2dmoe.phases.evaluate import Evaluation
from d2dmoe.phases.split import split_model
from tests.conftest import compose_config
from tests.test_attention import batch_for, build, mlp_model, tiny

MODEL_CFGS = {  # the run's `model` config group, as model_spec receives it
    "bert": lambda a: {"_target_": "d2dmoe.models.BertAdapter", "name": "tiny_bert", "family": "bert",
                       "path": a.path, "pretrained": False, "config": a.config_overrides},
    "gpt2": lambda a: {"_target_": "d2dmoe.models.GPT2Adapter", "name": "tiny_gpt2", "family": "gpt2",
                       "path": None, "pretrained": False, "config": a.config_overrides},
    "llama": lambda a: {"_target_": "d2dmoe.models.LlamaAdapter", "name": "tiny_llama", "family": "llama",
                        "path": None, "pretrained": False, "config": a.config_overrides},
    "vit": lambda a: {"_target_": "d2dmoe.models.VitAdapter", "name": "tiny_vit", "family": "vit",
                      "path": a.path, "pretrained": False, "config": a.config_overrides},
}


def tiny_llama():
    from tests.test_families import tiny as tiny_lm

    return tiny_lm("llama", attn="sdpa")


def converted(family: str, attention: bool, width: float = 1.0, router_kind: str = "regression",
              activation: str = "relu"):
    """A tiny converted model and its spec. activation: `relu` swaps it into the FFNs, `keep` leaves
    the model's own (sparsity.activation); router_kind: `regression`, `moefication` or `moefication_original` routers."""
    adapter = tiny_llama() if family == "llama" else tiny(family, attn="sdpa")
    if attention and activation == "relu":
        model = mlp_model(family, adapter, width)
    elif attention:  # the projections' MLPs, the FFNs keeping the model's own activation
        torch.manual_seed(1)
        model = adapter.install_ffns(install_projection_mlps(adapter, build(family, adapter), width=width))
    else:
        model = adapter.install_ffns(build(family, adapter), nn.ReLU() if activation == "relu" else None).eval()
    hidden, attention_hidden = (8, 4) if router_kind == "moefication_original" else (16, 8)  # the former: E wide
    split_model(adapter, model, num_experts=8, router_hidden=hidden, router_kind=router_kind, n_init=1,
                attention=(4, attention_hidden) if attention else None)
    for p in model.parameters():  # routers trained or not, every weight must come back
        p.data.add_(torch.randn_like(p) * 0.01)
    num_labels = None if family in ("gpt2", "llama") else 3
    spec = {**model_spec(MODEL_CFGS[family](adapter), model, num_labels, activation, router_kind,
                         (4, attention_hidden) if attention else None),
            "metric": "loss" if family in ("gpt2", "llama") else "accuracy", "tau": 0.3, "budget": 0.5,
            "calibration": [{"tau": 0.0, "rel_cost": 1.0, "value": 0.9}, {"tau": 0.3, "rel_cost": 0.5, "value": 0.88},
                            {"tau": 1.0, "rel_cost": 0.3, "value": 0.6}],
            "measured": {"split": "test", "rel_cost": 0.5, "value": 0.88, "dense_value": 0.9, "experts_per_token": 2.0}}
    return adapter, model, spec


@pytest.mark.parametrize("family, attention, width", [
    ("bert", False, 1), ("bert", True, 1), ("bert", True, 2), ("gpt2", False, 1), ("gpt2", True, 1),
    ("vit", False, 1), ("vit", True, 1), ("llama", False, 1)])
def test_save_then_load_gives_identical_outputs(family, attention, width, tmp_path):
    adapter, model, spec = converted(family, attention, width)
    batch = batch_for("gpt2" if family == "llama" else family)
    set_gate(model, DynamicKGate(0.3))
    with torch.no_grad():
        expected = adapter.forward(model, batch)
    save(tmp_path / "m", model, spec)
    loaded = d2dmoe.load(tmp_path / "m")
    assert isinstance(loaded, ConvertedModel) and loaded.tau == 0.3
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(batch), expected)
        loaded.set_tau(0.0)  # every expert: a different, larger computation
        assert not torch.allclose(loaded.run(batch), expected)
    loaded.save_pretrained(tmp_path / "again")
    again = ConvertedModel.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        again.set_tau(0.3)
        torch.testing.assert_close(again.run(batch), expected)


@pytest.mark.parametrize("family, attention, router_kind, activation", [
    ("bert", False, "moefication", "keep"), ("gpt2", True, "moefication", "keep"), ("llama", False, "moefication", "keep"),
    ("vit", False, "regression", "keep"), ("bert", True, "moefication", "relu"),
    ("bert", True, "moefication_original", "relu")])
def test_router_kind_and_kept_activation_survive_save_and_load(family, attention, router_kind, activation, tmp_path):
    """MoEfication routers (tanh, sigmoid) and the model's own activation (sparsity.activation=keep:
    GELU, gelu_new, SiLU) come back from the folder: the same parameters would load into regression
    routers or ReLU experts too, so only the outputs and the modules tell them apart."""
    adapter, model, spec = converted(family, attention, router_kind=router_kind, activation=activation)
    spec["tau"] = 0.9  # fresh MoEfication routers' sigmoids sit near 0.5: a lower tau runs every expert
    batch = batch_for("gpt2" if family == "llama" else family)
    set_gate(model, DynamicKGate(0.9))
    with torch.no_grad():
        expected = adapter.forward(model, batch)
    layers = moe_layers(model)
    ran = torch.cat([m.last_mask.flatten() for m in layers]).float().mean()
    assert 0 < ran < 1  # the routers' choices shape the outputs
    assert (activation == "keep") == (not any(isinstance(m.act, nn.ReLU) for m in moe_layers(model, "ffn")))
    save(tmp_path / "m", model, spec)
    loaded = d2dmoe.load(tmp_path / "m")
    back = moe_layers(loaded)
    assert [(m.router.kind, type(m.act)) for m in back] == [(router_kind, type(m.act)) for m in layers]
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(batch), expected)


def test_set_budget_picks_the_best_tau_within_it():
    rows = [{"tau": 0.0, "rel_cost": 1.0, "value": 0.9}, {"tau": 0.2, "rel_cost": 0.6, "value": 0.9},
            {"tau": 0.5, "rel_cost": 0.45, "value": 0.85}, {"tau": 1.0, "rel_cost": 0.3, "value": 0.6}]
    assert choose_tau(rows, 0.7, "accuracy")["tau"] == 0.2  # ties in value go to the cheaper
    assert choose_tau(rows, 0.5, "accuracy")["tau"] == 0.5
    assert choose_tau(rows, 0.1, "accuracy")["tau"] == 1.0  # nothing fits: the cheapest
    losses = [{**r, "value": 5 - r["value"]} for r in rows]
    assert choose_tau(losses, 0.5, "loss")["tau"] == 0.5
    adapter, model, spec = converted("bert", False)
    m = ConvertedModel.wrap(model, adapter, spec)
    assert m.set_budget(0.4) == 1.0 and m.tau == 1.0


def test_broken_folders_give_clear_errors(tmp_path):
    _adapter, model, spec = converted("bert", False)
    folder = save(tmp_path / "m", model, spec)
    broken = tmp_path / "no_weights"
    shutil.copytree(folder, broken)
    (broken / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS}"):
        d2dmoe.load(broken)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(folder, mismatched)
    s = json.loads((mismatched / CONFIG).read_text())
    s["experts"]["num_experts"] = 4
    (mismatched / CONFIG).write_text(json.dumps(s))
    with pytest.raises(ValueError, match=rf"{WEIGHTS} does not match the architecture {CONFIG} describes: "
                                         r"bert\.encoder\.layer\.0\.intermediate\.w1 \(8, 8, 32\) in the file, "
                                         r"\(4, 16, 32\) in the model"):
        d2dmoe.load(mismatched)  # the file's tensors named, with both shapes
    (mismatched / CONFIG).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        d2dmoe.load(mismatched)


CALLED = []


def hostile(*args, **kwargs):
    """What a hostile folder would have loading call: it records that it ran."""
    CALLED.append((args, kwargs))


@pytest.mark.parametrize("where", ["adapter", "nested", "remote_code"])
def test_a_folder_naming_code_is_refused_and_nothing_in_it_runs(where, tmp_path):
    """A downloaded folder is data: a callable named in its d2dmoe.json is never imported or called,
    and the error names the key."""
    _adapter, model, spec = converted("bert", False)
    folder = save(tmp_path / "m", model, spec)
    s = json.loads((folder / CONFIG).read_text())
    named = f"{__name__}.hostile"
    if where == "adapter":
        s["adapter"]["_target_"] = named
        match = "adapter._target_ is"
    elif where == "nested":
        s["adapter"]["config"] = {"_target_": named, "_args_": ["ran"]}
        match = "adapter.config._target_: a converted model folder holds data only"
    else:
        s["adapter"]["trust_remote_code"] = True
        match = "adapter.trust_remote_code is true"
    (folder / CONFIG).write_text(json.dumps(s))
    CALLED.clear()
    with pytest.raises(UnsafeFolder, match=match):
        d2dmoe.load(folder)
    assert CALLED == []


def test_convert_command_meets_the_budget_on_held_out_data(tmp_path):
    """`d2dmoe convert` on the smoke config, with a tau per layer too: each operating point chosen on
    validation; on the test split the cost stays within the budget plus a stated tolerance of 0.05,
    for the saved per-layer taus and for the global tau reported beside them; `d2dmoe info` reports
    both; the saved model loads and reproduces the test metric it reports."""
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "d2dmoe.cli", "convert", "experiment=smoke", "convert.budget=0.9",
           "convert.per_layer=true", "convert.profile_batches=1", f"convert.out={out}",
           f"artifacts_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spec = json.loads((out / CONFIG).read_text())
    val = next(r for r in spec["calibration"] if r["tau"] == spec["tau"])
    assert val["rel_cost"] <= 0.9 and spec["global_measured"]["rel_cost"] <= 0.9 + 0.05
    val = next(r for r in spec["layer_calibration"] if r["taus"] == spec["layer_taus"])
    assert val["rel_cost"] <= 0.9 and spec["measured"]["rel_cost"] <= 0.9 + 0.05
    info = subprocess.run([sys.executable, "-m", "d2dmoe.cli", "info", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0 and "a tau per MoE layer" in info.stdout and f"one global tau {spec['tau']:g}" in info.stdout
    loaded = d2dmoe.load(out)
    assert loaded.layer_taus == spec["layer_taus"]
    ctx = pipeline.build_context(compose_config(["experiment=smoke"], artifacts_dir=tmp_path / "artifacts"))
    ev = ctx.test(Evaluation(loaded, loaded.d2dmoe_adapter, ctx.dims))
    assert (ev.value, ev.macs / ev.dense_macs) == pytest.approx((spec["measured"]["value"], spec["measured"]["rel_cost"]))
    loaded.set_tau(spec["tau"])
    ev = ctx.test(Evaluation(loaded, loaded.d2dmoe_adapter, ctx.dims))
    g = spec["global_measured"]
    assert (ev.value, ev.macs / ev.dense_macs) == pytest.approx((g["value"], g["rel_cost"]))
