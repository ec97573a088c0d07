"""A tau per MoE layer: the profile measures what each layer's gate would execute and lose (checked
against running the layer itself), the allocation picks the least-error taus within a cost, and a
converted model carries its per-layer taus through save and load."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import d2dmoe
from d2dmoe.calibrate import LayerProfile, allocate, allocation_for
from d2dmoe.export import ConvertedModel, save
from d2dmoe.moe import AllExperts, DynamicKGate, moe_layers, set_gate, set_layer_taus
from tests.test_attention import batch_for
from tests.test_export import converted

TAUS = [0.0, 0.3, 0.6, 1.0]


@pytest.mark.parametrize("family, attention", [("bert", False), ("gpt2", True)])
def test_profile_equals_gating_each_layer_alone(family, attention):
    """n_l(tau) and D_l(tau) from the profile against running the model with only layer l gated:
    the experts layer l executes on real tokens, and the KL divergence (torch's kl_div) of the
    outputs from the all-experts model's, per sample (bert) or per real token (gpt2)."""
    adapter, model, _spec = converted(family, attention)
    batch = batch_for(family, lengths=(9, 5))  # the second sample has 4 padding tokens
    profile = LayerProfile(model, adapter, TAUS)
    profile.on_test_epoch_start()
    with torch.no_grad():
        profile.test_step(batch, 0)
        set_gate(model, AllExperts())
        reference = adapter.forward(model, batch).log_softmax(-1)
        real = batch["attention_mask"].bool()
        for layer, moe in enumerate(moe_layers(model)):
            for j, tau in enumerate(TAUS):
                moe.gate = DynamicKGate(tau)
                out = adapter.forward(model, batch).log_softmax(-1)
                kl = F.kl_div(out, reference, log_target=True, reduction="none").sum(-1)  # [B] or [B, T]
                expected = kl[real].mean() if family == "gpt2" else kl.mean()
                assert profile.divergence[layer, j] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
                assert profile.experts[layer, j] == pytest.approx(float(moe.last_mask[real].sum(-1).double().mean()))
            moe.gate = AllExperts()
    assert (profile.divergence[:, 0] == 0).all()
    assert profile.experts[:, 0].tolist() == [m.num_experts for m in moe_layers(model)]  # tau 0: every expert
    assert (np.diff(profile.experts, axis=1) <= 0).all()  # a larger tau never runs more experts
    assert (profile.divergence >= 0).all()


def test_allocation_takes_the_least_error_within_the_cost():
    """Two layers, three taus each (cost falls, error rises). Layer 0 loses almost nothing at its
    middle tau; layer 1 loses a lot. Hand-enumerated optima: cost <= 6 -> (1, 0), error 0.01;
    cost <= 3 -> (1, 2), error 0.61; cost <= 1 is out of reach -> the cheapest (2, 2)."""
    error = np.array([[0.0, 0.01, 0.5], [0.0, 0.3, 0.6]])
    cost = np.array([[4.0, 2.0, 1.0], [4.0, 2.0, 1.0]])
    path = allocate(error, cost)
    assert [tuple(c) for c in path] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 2)]
    assert tuple(allocation_for(path, error, cost, 6)) == (1, 0)
    assert tuple(allocation_for(path, error, cost, 3)) == (1, 2)
    assert tuple(allocation_for(path, error, cost, 1)) == (2, 2)
    assert tuple(allocation_for(path, error, cost, 8)) == (0, 0)


def test_converted_model_keeps_its_layer_taus(tmp_path):
    adapter, model, spec = converted("bert", False)
    layers = len(moe_layers(model))
    taus = [0.1 * (i + 1) for i in range(layers)]
    spec = {**spec, "layer_taus": taus,
            "layer_calibration": [{"tau": 0.0, "taus": [0.0] * layers, "rel_cost": 1.0, "value": 0.9},
                                  {"tau": 0.3, "taus": taus, "rel_cost": 0.5, "value": 0.88}]}
    batch = batch_for("bert")
    set_layer_taus(model, taus)
    with torch.no_grad():
        expected = adapter.forward(model, batch)
    loaded = d2dmoe.load(save(tmp_path / "m", model, spec))
    assert loaded.layer_taus == pytest.approx(taus) and loaded.tau is None
    assert [m.gate.tau for m in moe_layers(loaded)] == pytest.approx(taus)
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(batch), expected)
    assert loaded.set_budget(0.7) == pytest.approx(taus)  # the per-layer table: best value within 0.7
    assert loaded.set_budget(1.0) == [0.0] * layers
    loaded.set_tau(0.5)
    assert loaded.layer_taus is None and {m.gate.tau for m in moe_layers(loaded)} == {0.5}
    with pytest.raises(ValueError, match="1 taus for"):
        ConvertedModel.wrap(model, adapter, {**spec, "layer_taus": [0.2]})


def test_profile_reads_only_the_batches_it_is_given(tmp_path):
    """convert.profile_batches bounds the profile's cost (L x J forward passes per batch):
    Context.test(batches=n) runs n batches of the split."""
    from d2dmoe import pipeline
    from d2dmoe.phases.evaluate import Evaluation
    from tests.conftest import compose_config

    ctx = pipeline.build_context(compose_config(["experiment=smoke", "data.eval_batch_size=8"], artifacts_dir=tmp_path))
    model = ctx.new_model("dense").eval()
    whole = ctx.test(Evaluation(model, ctx.adapter, ctx.dims), split="validation")
    first = ctx.test(Evaluation(model, ctx.adapter, ctx.dims), split="validation", batches=1)
    assert first.samples == len(next(iter(ctx.data.val_dataloader()))["labels"]) < whole.samples
