"""The converted model equals the model it came from when every expert runs."""
import copy

import pytest
import torch
from torch import nn

from d2dmoe.moe import FFN, ffn_layers, moe_layers
from d2dmoe.phases.split import split_model
from tests.conftest import compose_config


def adapter_for(overrides):
    from hydra.utils import instantiate

    return instantiate(compose_config(overrides).model)


def sample_batch(tokenizer):
    texts = ["The markets rallied after the central bank held rates.",
             "A short one.",
             "Striker scores twice as the home side wins the cup final in extra time."]
    return tokenizer(texts, padding=True, return_tensors="pt")


def assert_moe_equals_original(adapter, num_experts, num_labels=5):
    original = adapter.build(num_labels).eval()
    batch = sample_batch(adapter.tokenizer())
    with torch.no_grad():
        reference = original(**batch).logits
        converted = adapter.install_ffns(copy.deepcopy(original))  # keeps the model's own GELU
        assert len(ffn_layers(converted)) == adapter.dims(num_labels).layers
        torch.testing.assert_close(converted(**batch).logits, reference, rtol=1e-5, atol=1e-6)
        split_model(adapter, converted, num_experts, router_hidden=128, n_init=1)
        assert len(moe_layers(converted)) == adapter.dims(num_labels).layers
        assert not ffn_layers(converted)
        torch.testing.assert_close(converted(**batch).logits, reference, rtol=1e-5, atol=1e-6)


def test_tiny_bert_all_experts_equal_dense():
    assert_moe_equals_original(adapter_for(["model=tiny_bert"]), num_experts=8)


def test_minilm_all_experts_equal_dense():
    """The real pretrained MiniLM-L6, 64 experts of 24 neurons per layer."""
    adapter = adapter_for([])
    assert adapter.dims(5).d_ff == 1536
    assert_moe_equals_original(adapter, num_experts=64)


def test_relu_swap_changes_only_the_activation():
    adapter = adapter_for(["model=tiny_bert"])
    model = adapter.install_ffns(adapter.build(3), nn.ReLU())
    for ffn in ffn_layers(model):
        assert isinstance(ffn, FFN) and isinstance(ffn.act, nn.ReLU)
    block = adapter.blocks(model)[0]
    assert isinstance(block.output.dense, nn.Identity)


def test_dims_and_fixed_cost_of_minilm():
    """OFFLINE.md's figures for MiniLM at 128 tokens: attention 688k MACs and FFN 1.18M per token and layer."""
    adapter = adapter_for([])
    d = adapter.dims(5)
    assert (d.layers, d.d, d.d_ff) == (6, 384, 1536)
    t = torch.tensor([128.0])
    attention = (adapter.fixed_macs(t, d) - 384**2 - 384 * 5) / (6 * 128)
    assert attention.item() == pytest.approx(4 * 384**2 + 2 * 128 * 384)
    assert round(attention.item() / 1e3) == 688

