"""The analytic MAC count against torch's FlopCounterMode (2 FLOPs per MAC for matmuls)."""
import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe.cost import dense_macs, moe_model_macs
from d2dmoe.models import BertAdapter
from d2dmoe.crossover import set_impl
from d2dmoe.moe import DynamicKGate, TopKGate, moe_layers, set_gate
from d2dmoe.phases.split import split_model
from tests.conftest import compose_config


def tiny_adapter(layers=2, d=32, d_ff=64, heads=2):
    cfg = compose_config(["model=tiny_bert"]).model
    config = {"hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": d_ff}
    # eager attention: explicit matmuls that FlopCounterMode sees on the CPU
    return BertAdapter(cfg.name, cfg.path, pretrained=False, config=config, attn_implementation="eager")


def counted_macs(model, input_ids, attention_mask) -> float:
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, attention_mask=attention_mask)
    return counter.get_total_flops() / 2


def padded_batch(lengths, vocab=1000):
    torch.manual_seed(0)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("dims", [(2, 32, 64, 2), (3, 48, 96, 4)])
@pytest.mark.parametrize("lengths", [[7], [5, 12, 3], [16, 16]])
def test_dense_macs_match_flop_counter(dims, lengths):
    """Analytic cost of each sample in a padded batch = counted cost of that sample run alone."""
    adapter = tiny_adapter(*dims)
    model = adapter.build(num_labels=5).eval()
    model_dims = adapter.dims(5)
    ids, mask = padded_batch(lengths)
    analytic = dense_macs(adapter, mask.sum(-1), model_dims)
    for i, n in enumerate(lengths):
        counted = counted_macs(model, ids[i:i + 1, :n], mask[i:i + 1, :n])
        assert analytic[i].item() == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("lengths", [[9], [4, 11]])
def test_moe_macs_with_all_experts_match_flop_counter(lengths):
    """With every expert active the masked MoE computes all of them: counter = analytic."""
    adapter = tiny_adapter()
    model = adapter.build(num_labels=3).eval()
    adapter.install_ffns(model, nn.ReLU())
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1)
    model_dims = adapter.dims(3)
    ids, mask = padded_batch(lengths)
    for i, n in enumerate(lengths):
        counted = counted_macs(model, ids[i:i + 1, :n], mask[i:i + 1, :n])
        analytic = moe_model_macs(adapter, model, mask[i:i + 1, :n], model_dims)
        assert analytic.item() == pytest.approx(counted, rel=1e-9)


def test_moe_macs_count_only_executed_pairs_on_real_tokens():
    adapter = tiny_adapter()
    model = adapter.build(num_labels=3).eval()
    adapter.install_ffns(model, nn.ReLU())
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1)
    d = adapter.dims(3)
    ids, mask = padded_batch([4, 10])
    model(input_ids=ids, attention_mask=mask)
    moes = [m for m in model.modules() if m.__class__.__name__ == "MoE"]
    for m in moes:  # pretend exactly 3 experts ran for every position, padding included
        m.last_mask = torch.zeros(2, 10, 8, dtype=torch.bool)
        m.last_mask[..., :3] = True
    tokens = torch.tensor([4.0, 10.0])
    router = 32 * 16 + 16 * 8
    expert = 2 * 32 * (64 // 8)
    expected = adapter.fixed_macs(tokens, d) + d.layers * tokens * (router + 3 * expert)
    torch.testing.assert_close(moe_model_macs(adapter, model, mask, d), expected.double())


@pytest.mark.parametrize("k", [1, 3])
def test_gathered_moe_macs_match_flop_counter(k):
    """With gather execution only the chosen experts run, so the counter sees exactly the executed
    (token, expert) pairs: an independent check of the partial-routing cost."""
    adapter = tiny_adapter()
    model = adapter.build(num_labels=3).eval()
    adapter.install_ffns(model, nn.ReLU())
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1)
    set_gate(model, TopKGate(k))
    set_impl(model, "gather")
    ids, mask = padded_batch([9])
    counted = counted_macs(model, ids, mask)
    analytic = moe_model_macs(adapter, model, mask, adapter.dims(3))
    assert analytic.item() == pytest.approx(counted, rel=1e-9)


# Partial routing beyond top-k on BERT: gated experts (three matrices each), the MoE layers that
# replaced attention projections, and the dynamic-k gate, where tokens run different numbers of experts.
COUNTED_CASES = ["bert", "gpt2", "llama", "bert+attention", "gpt2+attention", "vit+attention"]
GATES = [TopKGate(2), DynamicKGate(0.5), DynamicKGate(0.7), DynamicKGate(0.9)]


@functools.cache
def converted_for_counting(case: str):
    """A tiny converted model (eager attention: explicit matmuls the counter sees), built once per
    case; each test sets its own gate and execution."""
    from tests.test_attention import mlp_model
    from tests.test_attention import tiny as tiny_with_projections
    from tests.test_families import tiny as tiny_lm

    family, _, attention = case.partition("+")
    if attention:  # projections as MLPs, then MoE layers of 4 experts beside the FFNs' 8
        adapter = tiny_with_projections(family)
        model = mlp_model(family, adapter)
    else:
        adapter = tiny_adapter() if family == "bert" else tiny_lm(family)
        model = adapter.install_ffns(adapter.build(3 if family == "bert" else None).eval(), nn.ReLU())
    split_model(adapter, model, num_experts=8, router_hidden=16, n_init=1, attention=(4, 8) if attention else None)
    return adapter, model, adapter.dims(None if family in ("gpt2", "llama") else 3)


def counting_batch(case: str, lengths=(12, 5)) -> dict:
    """Right-padded token ids (vocabulary 300 fits every tiny model); images have no padding."""
    if case.startswith("vit"):
        torch.manual_seed(0)
        return {"pixel_values": torch.randn(len(lengths), 1, 8, 8)}
    ids, mask = padded_batch(lengths, vocab=300)
    return {"input_ids": ids, "attention_mask": mask}


def sample(batch: dict, i: int, n: int) -> dict:
    """Sample i alone, without its padding (n real tokens)."""
    return {k: v[i:i + 1] if k == "pixel_values" else v[i:i + 1, :n] for k, v in batch.items()}


@pytest.mark.parametrize("gate", GATES, ids=repr)
@pytest.mark.parametrize("case", COUNTED_CASES)
def test_partially_routed_macs_match_flop_counter(case, gate):
    """Gather execution runs only the chosen (token, expert) pairs, so FlopCounterMode sees exactly
    them: the analytic cost of each sample of a padded batch (gate masks read from the batch's
    forward, padding left out) equals the counted cost of that sample run alone."""
    adapter, model, dims = converted_for_counting(case)
    set_gate(model, gate)
    set_impl(model, "gather")
    batch = counting_batch(case)
    real = adapter.token_mask(batch)
    with torch.no_grad():  # the inference gather path (gathered_inference)
        adapter.forward(model, batch)
        analytic = moe_model_macs(adapter, model, real, dims)
        in_batch = [moe.last_mask for moe in moe_layers(model)]  # [B, T, E] per layer
        for i, n in enumerate(real.sum(-1).tolist()):
            with FlopCounterMode(display=False) as counter:
                adapter.forward(model, sample(batch, i, n))
            # the premise: alone, the sample's tokens choose the experts they chose in the batch
            assert all(torch.equal(moe.last_mask[0], mask[i, :n]) for moe, mask in zip(moe_layers(model), in_batch))
            assert analytic[i].item() == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    # every layer ran partially (gather, not the all-experts matmul), and under dynamic-k unevenly
    routed = [mask[real.bool()] for mask in in_batch]  # [real tokens, E] per layer
    assert all(not r.all() for r in routed)
    runs = torch.cat([r.sum(-1) for r in routed])  # experts per real token, every layer
    assert (runs == 2).all() if isinstance(gate, TopKGate) else runs.min() < runs.max()
