"""CATS and TEAL (thresholds.py) against a direct, token-by-token computation on a tiny gated Llama
and a tiny GPT-2: outputs, the MACs counted (only the weights a zero leaves unread), and the
calibrated thresholds zeroing the target share of the calibration tokens' activations."""
import copy

import pytest
import torch

from d2dmoe.cost import dense_macs, thresholded_model_macs
from d2dmoe.thresholds import calibrate, install, set_target, thresholded_layers
from tests.test_families import padded_batch, tiny


def reference_ffn(ffn, x, rule, t):
    """One token x [d] through the FFN as the papers define the rule; (output [d], MACs read)."""
    w1, w2 = ffn.w1.weight, ffn.w2.weight
    b1 = ffn.w1.bias if ffn.w1.bias is not None else torch.zeros(w1.shape[0])
    b2 = ffn.w2.bias if ffn.w2.bias is not None else torch.zeros(w2.shape[0])
    up = None if ffn.up is None else ffn.up.weight
    d, F_ = w1.shape[1], w1.shape[0]
    if rule == "cats":
        a = ffn.act(w1 @ x + b1)
        keep = [j for j in range(F_) if abs(a[j]) > t["a"]]
        out = b2.clone()
        for j in keep:
            hj = a[j] * (up[j] @ x) if up is not None else a[j]
            out = out + w2[:, j] * hj
        return out, d * F_ + (2 if up is not None else 1) * d * len(keep)
    keep_x = [i for i in range(d) if abs(x[i]) > t["x"]]
    xs = torch.zeros_like(x)
    xs[keep_x] = x[keep_x]
    h = ffn.act(w1 @ xs + b1)
    if up is not None:
        h = h * (up @ xs)
    keep_h = [j for j in range(F_) if abs(h[j]) > t["h"]]
    out = b2 + sum((w2[:, j] * h[j] for j in keep_h), torch.zeros(w2.shape[0]))
    return out, (2 if up is not None else 1) * F_ * len(keep_x) + d * len(keep_h)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("rule", ["cats", "teal"])
def test_thresholded_ffn_equals_the_direct_computation(family, rule):
    adapter = tiny(family)
    model = install(adapter, adapter.build(None).eval(), rule)
    batches = [padded_batch([12, 7, 9])]
    calibrate(model, adapter, batches, [0.5])
    set_target(model, 0.5)
    layer = thresholded_layers(model)[0]
    torch.manual_seed(1)
    x = torch.randn(2, 5, layer.d)
    with torch.no_grad():
        out = layer(x)
        for b in range(2):
            for t in range(5):
                want, macs = reference_ffn(layer.ffn, x[b, t], rule, layer.thresholds[0.5])
                torch.testing.assert_close(out[b, t], want, rtol=1e-5, atol=1e-6)
                assert layer.last_macs[b, t].item() == macs


@pytest.mark.parametrize("rule", ["cats", "teal"])
def test_calibration_zeroes_the_target_share_and_the_cost_follows(rule):
    """On the calibration tokens themselves, each threshold zeroes the target share of its entries
    (within one entry in a thousand); the model's counted cost falls as the target rises, and at no
    target is it above dense."""
    adapter = tiny("llama")
    dense = adapter.build(None).eval()
    model = install(adapter, copy.deepcopy(dense), rule)
    batch = padded_batch([16, 11, 14, 9])
    real = batch["attention_mask"].bool()
    targets = [0.25, 0.5, 0.75]
    calibrate(model, adapter, [batch], targets)
    captured = []
    layers = thresholded_layers(model)
    hooks = [layer.register_forward_pre_hook(lambda m, args: captured.append((m, args[0][real]))) for layer in layers]
    with torch.no_grad():
        set_target(model, None)
        adapter.forward(model, batch)
    for h in hooks:
        h.remove()
    for layer, x in captured:
        for target in targets:
            for key, values in layer.magnitudes(x).items():
                share = (values <= layer.thresholds[target][key]).float().mean().item()
                assert share == pytest.approx(target, abs=1e-3), (rule, key, target)
    dims = adapter.dims()
    mask = batch["attention_mask"]
    full = dense_macs(adapter, mask.sum(-1), dims)
    costs = []
    with torch.no_grad():
        for target in targets:
            set_target(model, target)
            adapter.forward(model, batch)
            costs.append(thresholded_model_macs(adapter, model, mask, dims).sum().item())
        set_target(model, None)
        torch.testing.assert_close(adapter.forward(model, batch), adapter.forward(dense, batch))
        assert thresholded_model_macs(adapter, model, mask, dims).sum().item() == pytest.approx(full.sum().item())
    assert costs[0] > costs[1] > costs[2] and costs[0] < full.sum().item()


@pytest.mark.parametrize("rule", ["cats", "teal"])
def test_a_baseline_run_trains_nothing_after_dense_and_gives_a_point_per_sparsity(rule, tmp_path):
    from d2dmoe import pipeline
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=smoke", f"method={rule}", "method.sparsities=[0.3,0.6,0.9]"],
                         artifacts_dir=tmp_path)
    assert [p.name for p in pipeline.chain(cfg)] == ["dense"]
    points = pipeline.run(cfg).points
    assert [p["method"] for p in points] == ["dense", rule, rule, rule]
    assert [p.get("sparsity") for p in points[1:]] == [0.3, 0.6, 0.9]
    costs = [p["rel_cost"] for p in points[1:]]
    assert 1 > costs[0] > costs[1] > costs[2]
    assert sorted(d.name.split("-")[0] for d in tmp_path.iterdir() if not d.name.startswith(".")) == ["data", "dense"]
