"""Data sources through HF datasets, the fixed split, the tokenisation cache."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from d2dmoe.data import LengthGroupedBatches, TextClassificationData, load_text_folder
from tests.conftest import compose_config

SHARED_CARER = Path(__file__).resolve().parents[2] / "shared" / "data" / "carer"


@pytest.fixture(scope="module")
def tokenizer():
    return instantiate(compose_config(["model=tiny_bert"]).model).tokenizer()


def write_folder(root: Path, per_class=10):
    for c in ("alpha", "beta", "gamma"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i:03d}.txt").write_text(f"{c} document number {i} " * (i + 1))
    return root


def test_text_folder_split_is_fixed_stratified_and_disjoint(tmp_path):
    root = write_folder(tmp_path / "docs")
    a, removed = load_text_folder(root, 0.2, 0.2, seed=0)
    b, _ = load_text_folder(root, 0.2, 0.2, seed=0)
    assert removed["removed"] == 0
    assert [len(a[s]) for s in ("train", "validation", "test")] == [18, 6, 6]
    for s in a:
        assert a[s]["text"] == b[s]["text"]
    texts = [set(a[s]["text"]) for s in a]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sorted(a["test"]["label"]) == [0, 0, 1, 1, 2, 2]
    assert a["train"].features["label"].names == ["alpha", "beta", "gamma"]


def test_bbc_news_default_split(tmp_path, tokenizer):
    cfg = compose_config(["model=tiny_bert"], artifacts_dir=tmp_path).data
    data = instantiate(cfg, tokenizer=tokenizer)
    data.setup()
    # 2,225 articles less 103 repeats (d2dmoe.dedup), cut 60/20/20
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [1272, 425, 425]
    assert data.removed == {"removed": 103, "per_split": {}}
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    batch = next(iter(data.test_dataloader()))
    assert batch["input_ids"].shape[1] <= 128 and batch["attention_mask"].shape == batch["input_ids"].shape


def write_carer_like(root: Path):
    root.mkdir()
    rows = {"train": ["i feel great;joy", "so sad today;sadness", "what a surprise;surprise", "i am scared;fear"],
            "val": ["i feel happy;joy", "angry now;anger"], "test": ["i love this;love", "gloomy;sadness"]}
    for split, lines in rows.items():
        (root / f"{split}.txt").write_text("text;label_name\n" + "\n".join(lines) + "\n")
    return root


def carer_data(path, tmp_path, tokenizer, **kw):
    cfg = compose_config(["model=tiny_bert", "data=carer", f"data.path={path}"], artifacts_dir=tmp_path).data
    return instantiate(cfg, tokenizer=tokenizer, **kw)


def test_local_split_files_with_label_names(tmp_path, tokenizer):
    data = carer_data(write_carer_like(tmp_path / "carer"), tmp_path, tokenizer)
    data.setup()
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [4, 2, 2]
    assert data.splits["train"]["labels"] == [1, 0, 5, 4]  # dair-ai/emotion's label ids
    assert data.splits["test"]["labels"] == [2, 0]
    assert data.num_labels == 6


def test_tokenised_once_then_read_from_cache(tmp_path, tokenizer, monkeypatch):
    path = write_carer_like(tmp_path / "carer")
    carer_data(path, tmp_path, tokenizer).setup()
    monkeypatch.setattr(TextClassificationData, "_raw", lambda self: pytest.fail("re-read the raw data"))
    again = carer_data(path, tmp_path, tokenizer)
    again.setup()
    assert len(again.splits["train"]) == 4
    with pytest.raises(pytest.fail.Exception):  # another max_length is another cache entry
        carer_data(path, tmp_path, tokenizer, max_length=16).setup()


def test_missing_columns_are_named(tmp_path, tokenizer):
    path = write_carer_like(tmp_path / "carer")
    cfg = compose_config(["model=tiny_bert", "data=carer", f"data.path={path}", "data.text_column=sentence"],
                         artifacts_dir=tmp_path).data
    with pytest.raises(KeyError, match="sentence"):
        instantiate(cfg, tokenizer=tokenizer).setup()


@pytest.mark.skipif(not SHARED_CARER.is_dir(), reason="../shared/data/carer not present")
def test_shared_carer(tmp_path, tokenizer):
    data = carer_data(SHARED_CARER, tmp_path, tokenizer)
    data.setup()
    # the files hold 16,000, 2,000 and 2,000 texts; repeats leave train and validation (d2dmoe.dedup)
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [15953, 1995, 2000]
    assert set(data.splits["test"]["labels"]) == set(range(6))


def test_length_grouped_batches_cover_every_sample_once():
    lengths = [5, 30, 7, 12, 30, 2, 9, 18, 21, 3, 11]
    train = LengthGroupedBatches(lengths, batch_size=3, shuffle=True, seed=0, window=2)
    first, second = list(train), list(train)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(len(b) <= 3 for b in batches) and len(batches) == len(train)
    assert first != second  # a new order each epoch
    assert list(LengthGroupedBatches(lengths, 3, shuffle=True, seed=0, window=2)) == first  # seeded
    evaluation = list(LengthGroupedBatches(lengths, batch_size=4, shuffle=False))
    flat = [lengths[i] for b in evaluation for i in b]
    assert flat == sorted(lengths, reverse=True)


def test_the_run_seed_moves_the_training_order_not_the_splits(tmp_path, tokenizer):
    """Seeds are replicates on the same examples: the splits stay put, the training batches reorder."""
    cfg = compose_config(["model=tiny_bert"], artifacts_dir=tmp_path).data

    def first_batches(seed):
        data = instantiate(cfg, tokenizer=tokenizer)
        data.train_seed = seed
        data.setup()
        return (next(iter(data.train_dataloader()))["input_ids"], next(iter(data.test_dataloader()))["input_ids"],
                next(iter(data.val_dataloader()))["input_ids"])

    (train0, test0, val0), (train1, test1, val1) = first_batches(0), first_batches(1)
    assert torch.equal(test0, test1) and torch.equal(val0, val1)
    assert not torch.equal(train0, train1)
