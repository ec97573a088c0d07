"""No item in two splits: the key normalisation, the precedence of the reporting split, and every
dataset the project ships or names, read as a run reads it."""
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from d2dmoe import dedup as dd
from d2dmoe.data import load_splits, load_text_folder
from d2dmoe.image_data import ImageClassificationData
from tests.conftest import compose_config

SPLITS = ("train", "validation", "test")
SHARED_CARER = Path(__file__).resolve().parents[2] / "shared" / "data" / "carer"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_text_key_joins_copies_that_differ_in_case_spacing_and_punctuation():
    assert dd.text_key("Shares rose, sharply!\n") == dd.text_key("  shares ROSE sharply ")
    assert dd.text_key("ﬁnal score") == dd.text_key("final score")  # NFKC: the ligature is two letters
    assert dd.text_key("shares rose") != dd.text_key("shares fell")


def test_disjoint_keeps_the_test_split_whole_and_each_key_once():
    keys = {"train": ["a", "b", "b", "c", "d"], "validation": ["c", "e", "e"], "test": ["d", "c", "f"]}
    kept = dd.disjoint(keys)
    assert kept == {"train": [0, 1], "validation": [1], "test": [0, 1, 2]}
    assert dd.first_of_each(["x", "y", "x", "z", "y"]) == [0, 1, 3]


def assert_disjoint(keys: dict[str, list[str]]):
    for i, a in enumerate(SPLITS):
        assert len(set(keys[a])) == len(keys[a]), f"a repeat inside {a}"
        for b in SPLITS[i + 1:]:
            shared = set(keys[a]) & set(keys[b])
            assert not shared, f"{len(shared)} items in both {a} and {b}"


def text_keys(raw, column="text") -> dict[str, list[str]]:
    return {s: [dd.text_key(t) for t in raw[s][column]] for s in SPLITS}


def image_keys(data: ImageClassificationData) -> dict[str, list[str]]:
    data.setup()
    return {s: [dd.bytes_key(data.splits[s][i]["pixel_values"].numpy().tobytes()) for i in range(len(data.splits[s]))]
            for s in SPLITS}


def test_text_folder_with_planted_copies(tmp_path):
    root = tmp_path / "docs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(20):
            (root / c / f"{i}.txt").write_text(f"{c} story {i}")
    (root / "a" / "copy.txt").write_text("A  story 3!")  # a copy of a/3.txt, spaced and cased otherwise
    (root / "b" / "copy.txt").write_text("b story 7")
    raw, removed = load_text_folder(root, 0.2, 0.2, seed=0)
    assert removed["removed"] == 2
    assert_disjoint(text_keys(raw))
    raw, removed = load_text_folder(root, 0.2, 0.2, seed=0, dedup=False)
    assert removed is None and sum(len(raw[s]) for s in SPLITS) == 42


def test_local_split_files_lose_copies_from_train_and_validation_not_test(tmp_path):
    root = tmp_path / "carer"
    root.mkdir()
    rows = {"train": ["i feel great;joy", "I feel great!;joy", "so sad;sadness", "gloomy;sadness", "fine;joy"],
            "val": ["so sad;sadness", "angry now;anger", "meh;joy"], "test": ["gloomy;sadness", "i love this;love"]}
    for split, lines in rows.items():
        (root / f"{split}.txt").write_text("text;label_name\n" + "\n".join(lines) + "\n")
    raw, removed = load_splits(str(root), ";", 0.1, 0.2, 0, dedup_column="text")
    assert removed["per_split"] == {"train": 3, "validation": 0, "test": 0}
    assert len(raw["test"]) == 2
    assert_disjoint(text_keys(raw))


def test_one_file_is_deduplicated_before_its_splits_are_cut(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"line {i % 30}" for i in range(90)) + "\n")
    raw, removed = load_splits(str(path), None, 0.2, 0.2, 0, dedup_column="text")
    assert removed["removed"] == 60 and sum(len(raw[s]) for s in SPLITS) == 30
    assert_disjoint(text_keys(raw))


@pytest.fixture(scope="module")
def tokenizer():
    return instantiate(compose_config(["model=tiny_bert"]).model).tokenizer()


@pytest.mark.parametrize("name", ["bbc_news", "bbc_news_lm", "carer"])
def test_shipped_text_data_has_no_item_in_two_splits(name, tmp_path, tokenizer):
    if name == "carer" and not SHARED_CARER.is_dir():
        pytest.skip("../shared/data/carer not present")
    extra = [f"data.path={SHARED_CARER}"] if name == "carer" else []
    data = instantiate(compose_config(["model=tiny_bert", f"data={name}", *extra], artifacts_dir=tmp_path).data,
                       tokenizer=tokenizer)
    raw = data._raw()
    assert_disjoint(text_keys(raw, data.text_column))
    # BBC News ships 103 repeated articles; CARER's files repeat 52 texts inside or across splits
    assert data.removed["removed"] == {"bbc_news": 103, "bbc_news_lm": 103, "carer": 52}[name]
    if name == "carer":
        assert data.removed["per_split"]["test"] == 0 and len(raw["test"]) == 2000


def test_digits_have_no_image_in_two_splits():
    assert_disjoint(image_keys(ImageClassificationData("digits", "digits")))


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} not present (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_has_no_image_in_two_splits():
    data = ImageClassificationData("fashion_mnist", "idx", str(FASHION))
    keys = image_keys(data)
    assert_disjoint(keys)
    assert len(keys["test"]) == 10000  # the reporting split stays whole


def test_image_folder_with_planted_copies(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(12)]
    for split, ids in (("train", [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 9]), ("val", [9, 10, 11])):
        for c in ("x", "y"):
            (tmp_path / split / c).mkdir(parents=True)
        for n, i in enumerate(ids):
            Image.fromarray(images[i]).save(tmp_path / split / ("x" if i % 2 else "y") / f"{n}.png")
    data = ImageClassificationData("folder", "image_folder", str(tmp_path), image_size=8, val_fraction=0.25)
    keys = image_keys(data)
    # train holds image 0 twice and image 9, which is also a test image: two removed, test whole
    assert data.removed["per_split"] == {"test": 0, "train": 2} and len(keys["test"]) == 3
    # train's images are randomly cropped: compare its files, not its pixels, with validation's
    files = {s: {data.splits[s].dataset.data.samples[i][0] for i in data.splits[s].indices} for s in ("train", "validation")}
    assert not files["train"] & files["validation"]
    assert_disjoint({s: keys[s] if s != "train" else [] for s in SPLITS})
