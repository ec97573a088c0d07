"""Every architecture of the layout table (models/layouts.py), each from a tiny random config saved as
a local folder, as a user's model would be: the model with its FFNs as `FFN`s, and then cut into
experts with all of them on, computes what the original did; dense and converted MACs equal
FlopCounterMode / 2 per sample of a padded batch; attention projections are found where the layout
allows. And a layout the table lacks, given in the model config."""
import copy

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe.attention import projection_slots
from d2dmoe.cost import dense_macs, moe_model_macs
from d2dmoe.models import BertAdapter, CausalLMAdapter
from d2dmoe.models.layouts import LAYOUTS
from d2dmoe.moe import ffn_layers, moe_layers
from d2dmoe.phases.split import split_model

VOCAB, LABELS = 300, 5
SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
LM = {**SHAPE, "vocab_size": VOCAB, "max_position_embeddings": 64}
# model_type -> (adapter, transformers config); gated LMs with grouped-query attention (2 K/V heads)
ARCHITECTURES = {
    "bert": (BertAdapter, transformers.BertConfig(**SHAPE, vocab_size=VOCAB)),
    "roberta": (BertAdapter, transformers.RobertaConfig(**SHAPE, vocab_size=VOCAB)),
    "xlm-roberta": (BertAdapter, transformers.XLMRobertaConfig(**SHAPE, vocab_size=VOCAB)),
    "distilbert": (BertAdapter, transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                              vocab_size=VOCAB)),
    "gpt2": (CausalLMAdapter, transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64,
                                                      vocab_size=VOCAB)),
    "gpt_neox": (CausalLMAdapter, transformers.GPTNeoXConfig(**LM)),
    "llama": (CausalLMAdapter, transformers.LlamaConfig(**LM, num_key_value_heads=2)),
    "mistral": (CausalLMAdapter, transformers.MistralConfig(**LM, num_key_value_heads=2)),
    "qwen2": (CausalLMAdapter, transformers.Qwen2Config(**LM, num_key_value_heads=2)),
    "gemma": (CausalLMAdapter, transformers.GemmaConfig(**LM, num_key_value_heads=2, head_dim=16)),
    "phi3": (CausalLMAdapter, transformers.Phi3Config(**LM, num_key_value_heads=2, pad_token_id=0)),
}
TRANSFORMERS_LAYOUTS = sorted(set(LAYOUTS) - {"timm_vit"})


def test_every_transformers_layout_is_tested():
    assert sorted(ARCHITECTURES) == TRANSFORMERS_LAYOUTS


def saved(tmp_path, model_type: str, attn: str = "eager", **kwargs):
    """The architecture's adapter on a local folder holding only its config.json (no weights: built
    from the config)."""
    cls, config = ARCHITECTURES[model_type]
    config.save_pretrained(tmp_path)
    return cls(model_type, path=str(tmp_path), pretrained=False, attn_implementation=attn, **kwargs)


def batch_of(lengths):
    torch.manual_seed(0)
    T = max(lengths)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.randint(3, VOCAB, (len(lengths), T)) * mask, "attention_mask": mask}


def counted_macs(adapter, model, batch) -> float:
    with FlopCounterMode(display=False) as counter:
        adapter.forward(model, batch)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_all_experts_equal_the_original(model_type, tmp_path):
    adapter = saved(tmp_path, model_type, attn="sdpa")
    original = adapter.build(LABELS).eval()
    batch = batch_of([11, 6, 9])
    with torch.no_grad():
        reference = adapter.forward(original, batch)
        converted = adapter.install_ffns(copy.deepcopy(original))  # the model's own activation
        assert len(ffn_layers(converted)) == 2
        torch.testing.assert_close(adapter.forward(converted, batch), reference, rtol=1e-5, atol=1e-5)
        split_model(adapter, converted, num_experts=8, router_hidden=16, n_init=1)
        assert len(moe_layers(converted)) == 2 and not ffn_layers(converted)
        torch.testing.assert_close(adapter.forward(converted, batch), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_dense_and_converted_macs_match_flop_counter(model_type, tmp_path):
    """Each sample of a padded batch: the analytic cost equals the counted cost of that sample run
    alone, for the dense model and for its MoE with every expert on."""
    adapter = saved(tmp_path, model_type)
    dims = adapter.dims(LABELS)
    model = adapter.build(LABELS).eval()
    lengths = [7, 3, 12]
    batch = batch_of(lengths)
    analytic = dense_macs(adapter, batch["attention_mask"].sum(-1), dims)
    moe = adapter.install_ffns(copy.deepcopy(model), nn.ReLU())
    split_model(adapter, moe, num_experts=8, router_hidden=16, n_init=1)
    for i, n in enumerate(lengths):
        alone = {k: v[i:i + 1, :n] for k, v in batch.items()}
        assert analytic[i].item() == pytest.approx(counted_macs(adapter, model, alone), rel=1e-9)
        counted = counted_macs(adapter, moe, alone)
        assert moe_model_macs(adapter, moe, alone["attention_mask"], dims).item() == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("model_type", [t for t in sorted(ARCHITECTURES) if LAYOUTS[t].projections])
def test_attention_projections_are_found_and_cut_exactly(model_type, tmp_path):
    adapter = saved(tmp_path, model_type)
    model = adapter.build(LABELS).eval()
    batch = batch_of([8, 5])
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        slots = projection_slots(adapter, model)  # cuts fused QKV projections into their parts
        assert len(slots) == 2 * 4
        for parent, attr in slots:
            layer = getattr(parent, attr)
            assert isinstance(layer, nn.Linear) and layer.in_features == layer.out_features == 32
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-5, atol=1e-5)


def test_an_unknown_architecture_names_the_class_and_how_to_add_a_layout(tmp_path):
    transformers.ElectraConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB).save_pretrained(tmp_path)
    adapter = BertAdapter("electra", path=str(tmp_path), pretrained=False)
    with pytest.raises(ValueError, match=r"model_type 'electra'.*layouts exist for.*model.layout="):
        adapter.dims(LABELS)
    model = transformers.AutoModelForSequenceClassification.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path, num_labels=LABELS))
    with pytest.raises(ValueError, match=r"ElectraForSequenceClassification: no FFN layout for model_type 'electra'"):
        adapter.install_ffns(model)


def test_a_layout_from_the_model_config(tmp_path):
    """ELECTRA is not in the table; given its layout in the config (BERT's, under `electra`), it
    converts exactly and its cost stays exact. A wrong path names the block and the layout."""
    transformers.ElectraConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB).save_pretrained(tmp_path)
    bert = LAYOUTS["bert"]
    layout = {"blocks": "electra.encoder.layer", "ffn": bert.ffn, "w1": bert.w1, "w2": bert.w2, "act": bert.act,
              "identity": list(bert.identity)}
    adapter = BertAdapter("electra", path=str(tmp_path), pretrained=False, attn_implementation="eager",
                          layout=layout)
    model = adapter.build(LABELS).eval()
    batch = batch_of([6])
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        converted = adapter.install_ffns(copy.deepcopy(model))
        split_model(adapter, converted, num_experts=4, router_hidden=8, n_init=1)
        torch.testing.assert_close(adapter.forward(converted, batch), reference, rtol=1e-5, atol=1e-5)
    dims = adapter.dims(LABELS)
    assert dense_macs(adapter, torch.tensor([6]), dims).item() == pytest.approx(counted_macs(adapter, model, batch))
    wrong = BertAdapter("electra", path=str(tmp_path), pretrained=False, layout={**layout, "w1": "intermediate.fc"})
    with pytest.raises(ValueError, match=r"block class ElectraLayer: the layout's FFN paths do not match"):
        wrong.install_ffns(wrong.build(LABELS))
    with pytest.raises(ValueError, match=r"model.layout: unknown field\(s\) \['w3'\]"):
        BertAdapter("electra", path=str(tmp_path), layout={**layout, "w3": "x"}).dims(LABELS)
