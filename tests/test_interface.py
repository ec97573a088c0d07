"""A converted model is a transformers (or timm) model: its own class, outputs, `.config`,
`generate()`, pipelines and Auto classes; and a converted folder never loads as the dense model."""
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification,
                          GPT2LMHeadModel, PreTrainedTokenizerFast, pipeline)

import d2dmoe
from d2dmoe.export import ConvertedModel, save
from tests.test_attention import VOCAB, batch_for
from tests.test_export import converted


@pytest.fixture
def bert_folder(tmp_path):
    adapter, model, spec = converted("bert", False)
    return save(tmp_path / "bert", model, spec, adapter.tokenizer()), adapter


@pytest.fixture
def gpt2_folder(tmp_path):
    _, model, spec = converted("gpt2", False)
    return save(tmp_path / "gpt2", model, spec)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer for the tiny GPT-2's vocabulary: word i is `w<i>`, with three special tokens first."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    inner = Tokenizer(models.WordLevel({**specials, **{f"w{i}": i for i in range(3, VOCAB)}}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_the_loaded_model_is_the_original_class_with_its_outputs(bert_folder):
    folder, adapter = bert_folder
    loaded = d2dmoe.load(folder)
    assert isinstance(loaded, BertForSequenceClassification) and isinstance(loaded, ConvertedModel)
    assert type(loaded.config).__name__ == "BertConfig" and loaded.tau == 0.3
    batch = batch_for("bert")
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(out.logits, loaded.run(batch))


def test_auto_classes_load_the_converted_model_and_never_the_dense_one(bert_folder):
    folder, _ = bert_folder
    auto = AutoModelForSequenceClassification.from_pretrained(folder)
    loaded = d2dmoe.load(folder)
    batch = batch_for("bert")
    assert isinstance(auto, ConvertedModel)
    with torch.no_grad():
        torch.testing.assert_close(auto.run(batch), loaded.run(batch))
    # without d2dmoe, transformers refuses the folder instead of building a dense BERT with random FFNs
    code = ("from transformers import AutoModelForSequenceClassification as A\n"
            f"A.from_pretrained({str(folder)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "d2dmoe" in result.stderr


def test_generate_is_greedy_decoding_through_the_converted_forward(gpt2_folder):
    loaded = AutoModelForCausalLM.from_pretrained(gpt2_folder)
    assert isinstance(loaded, GPT2LMHeadModel) and isinstance(loaded, ConvertedModel)
    prompt = torch.tensor([[5, 9, 13, 7]])
    expected = prompt
    with torch.no_grad():
        for _ in range(6):  # step by step: the whole sequence through the forward, argmax of the last position
            nxt = loaded(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
        for cache in (True, False):
            out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                                  use_cache=cache, pad_token_id=2)
            assert out.tolist() == expected.tolist(), f"use_cache={cache}"


def test_pipelines_run_the_converted_model(bert_folder, gpt2_folder):
    folder, adapter = bert_folder
    loaded = d2dmoe.load(folder)
    classify = pipeline("text-classification", model=loaded, tokenizer=adapter.tokenizer())
    text = "shares rose after record profits"
    enc = adapter.tokenizer()(text, return_tensors="pt")
    with torch.no_grad():
        best = int(loaded(**enc).logits.argmax(-1))
    assert classify(text)[0]["label"] == loaded.config.id2label[best]
    lm = d2dmoe.load(gpt2_folder)
    tokenizer = word_tokenizer()
    generate = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    generated = generate("w5 w9 w13", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer("w5 w9 w13", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 9, 13]]
    with torch.no_grad():
        direct = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=2, eos_token_id=1)
    assert list(generated) == direct[0].tolist() and len(generated) > 3  # it generated


def test_save_pretrained_keeps_the_operating_point(gpt2_folder, tmp_path):
    loaded = d2dmoe.load(gpt2_folder)
    loaded.set_tau(0.7)
    again = d2dmoe.load(loaded.save_pretrained(tmp_path / "again"))
    assert again.tau == 0.7 and type(again).__qualname__ == "D2DMoEGPT2LMHeadModel"
    batch = batch_for("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(again.run(batch), loaded.run(batch))


def test_a_hub_id_loads_through_the_hub_cache(gpt2_folder, tmp_path, monkeypatch):
    """`d2dmoe.load("owner/name")` goes through huggingface_hub's snapshot_download: offline here, it
    resolves the id in the hub cache, laid out as a download leaves it."""
    import shutil

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--me--tiny-moe"
    shutil.copytree(gpt2_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = d2dmoe.load("me/tiny-moe")
    batch = batch_for("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.run(batch), d2dmoe.load(gpt2_folder).run(batch))
