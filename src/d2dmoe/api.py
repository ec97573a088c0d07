"""`d2dmoe.convert`: the conversion as one Python call, on a transformers model and data in memory.

    import d2dmoe
    result = d2dmoe.convert(model, train, val, test, tokenizer=tokenizer, budget=0.5,
                            sparsity={"alpha": 1e-3}, experts={"num_experts": 16})
    result.model      # the converted model: the original's class, forward, outputs and generate()
    result.points     # each tau on validation, the chosen operating point on test
    result.model.save_pretrained("my-moe", tokenizer)

The run is `d2dmoe convert`'s own: the model (with its tokenizer) and the data are written once into
folders named by their content under the artifacts directory (`inputs/`), and the job's config
points at them (model=auto), so the same phases run, artifacts are reused for the same inputs and
settings, and the operating point is chosen on validation only (conversion.convert_to_budget).

Data: a `datasets.Dataset` with a `text` column (and `label` for classifiers), a list of such dicts,
a list of (text, label) pairs, or (language models) a list of texts. Labels are the model's class
indices or names (its config's id2label).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from .conversion import Conversion, convert_to_budget
from .job import quiet_libraries

SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
SHORT_KEYS = {"budget": "convert.budget", "per_layer": "convert.per_layer"}


def convert(model: nn.Module, train_data, val_data, test_data=None, *, tokenizer=None, budget: float = 0.5,
            out: str | Path | None = None, per_layer: bool = False, progress: bool = True, **settings) -> Conversion:
    """Convert `model` (a transformers sequence classifier or causal LM) into a dynamic-k MoE whose
    validation rel_cost is within `budget`, trained on `train_data`, chosen on `val_data`, measured
    on `test_data` (on validation again, and said so in `measured.split`, when there is none).

    settings: any key of `d2dmoe convert`'s config, by group, e.g. `sparsity={"alpha": 1e-3}`,
    `experts={"num_experts": 16}`, `routing={"taus": [0.1, 0.3]}`, `dense={"epochs": 3}` (the model
    is taken as the trained reference, dense.epochs=0, unless told), `seed=1`, `artifacts_dir=...`;
    a string selects a group's option (`trainer="ddp"`). Returns the converted model, the dense
    reference, the measured points and the spec (saved to `out` too when given)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"d2dmoe.convert takes a transformers model in memory, got {type(model).__name__}; for a timm "
                        "model (or images), save it to a folder and run `d2dmoe convert model.path=DIR data=...` "
                        "(d2dmoe convert --help)")
    tokenizer = tokenizer if tokenizer is not None else own_tokenizer(model)
    overrides, values = split_settings({**settings, "budget": budget, "per_layer": per_layer})
    artifacts_dir = Path(values.pop("artifacts_dir", None) or os.environ.get("D2DMOE_ARTIFACTS", "artifacts"))
    language_model = is_causal_lm(model)
    names = None if language_model else label_names(model, values.get("dense", {}).get("epochs", 0), train_data)
    model_dir = write_model(model, tokenizer, artifacts_dir / "inputs")
    data_dir = write_data({"train": train_data, "validation": val_data, "test": test_data}, names,
                          artifacts_dir / "inputs")
    cfg = config(overrides, values, {
        "artifacts_dir": str(artifacts_dir.resolve()),
        "model": {"path": str(model_dir), "name": settings.get("name") or model_name(model)},
        "data": {"kind": "splits", "path": str(data_dir), "name": data_dir.name, "text_column": "text",
                 "delimiter": None, "test_fraction": 0.0 if test_data is None else 0.2,
                 **({} if language_model else {"label_column": "label", "label_names": names})},
        "dense": {"epochs": 0},
        "trainer": {"enable_progress_bar": progress}}, language_model)
    quiet_libraries()  # Lightning's banners would come once per measured tau
    return convert_to_budget(cfg, progress=progress, out=out)


def split_settings(settings: dict) -> tuple[list[str], dict]:
    """(Hydra overrides choosing group options, nested values to merge): a string for a config group
    chooses its option; everything else is a value (short keys spelled out: budget -> convert.budget)."""
    overrides, values = [], {}
    for key, value in settings.items():
        if key == "name":
            continue
        if key in SHORT_KEYS:
            group, leaf = SHORT_KEYS[key].split(".")
            values.setdefault(group, {})[leaf] = value
        elif isinstance(value, str) and key in config_groups():
            overrides.append(f"{key}={value}")
        else:
            values[key] = value
    return overrides, values


def config_groups() -> set[str]:
    conf = Path(__file__).resolve().parent / "conf"
    return {p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")}


def config(overrides: list[str], given: dict, ours: dict, language_model: bool):
    """The composed config: model=auto and the task's data group, the user's group choices, then our
    values (where the inputs are), then the user's (which win: dense.epochs among them). A key the
    config lacks is a typo, and merging it fails naming it."""
    data = "bbc_news_lm" if language_model else "bbc_news"
    with initialize_config_module("d2dmoe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=auto", f"data={data}", "logger=none",
                                                           *overrides])
    return OmegaConf.merge(cfg, OmegaConf.create(ours), OmegaConf.create(given))


def is_causal_lm(model: nn.Module) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)()) and not model.config.is_encoder_decoder


def model_name(model: nn.Module) -> str:
    """A label for points and folders: the name it was loaded under, else its model_type."""
    name = Path(str(getattr(model.config, "_name_or_path", "") or "")).name
    return name or model.config.model_type


def own_tokenizer(model: nn.Module):
    from transformers import AutoTokenizer

    source = getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise ValueError(f"d2dmoe.convert: no tokenizer given, and none loads from the model's name {source!r} "
                         f"({type(err).__name__}); pass tokenizer=") from err


def label_names(model: nn.Module, dense_epochs: int, train_data) -> list[str]:
    """The classes in index order: a classifier's own (its config's id2label); for a model without a
    sequence-classification head, which the dense phase must then fine-tune (else the reference would
    classify with random weights), the training labels' (names sorted, or indices 0..max)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if not dense_epochs:
        raise ValueError(f"d2dmoe.convert: {type(model).__name__} has no sequence-classification head, so the reference "
                         "would classify with random weights; pass a fine-tuned *ForSequenceClassification model, "
                         "or have it fine-tuned first with dense={'epochs': 3}")
    labels = {pair(item, "train", i).get("label") for i, item in enumerate(train_data)}
    if all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(x) for x in labels)


def content_folder(parent: Path, kind: str, write) -> Path:
    """`write(tmp)` fills a new folder; it is kept as <parent>/<kind>-<hash of its files>, so the same
    inputs give the same folder (and the same artifact names) again."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{kind}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    digest = hashlib.sha256()
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        digest.update(f.relative_to(tmp).as_posix().encode())
        with f.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    target = parent / f"{kind}-{digest.hexdigest()[:12]}"
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def write_model(model: nn.Module, tokenizer, parent: Path) -> Path:
    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        fast = folder / "tokenizer.json"
        if fast.is_file():  # the last call's truncation and padding, which every call sets anew: not content
            state = json.loads(fast.read_text())
            fast.write_text(json.dumps({**state, "truncation": None, "padding": None}, ensure_ascii=False))

    return content_folder(parent, "model", write)


def rows(data, names: list[str] | None, split: str) -> list[dict]:
    """A split as {"text"[, "label" (a class index)]} rows (the accepted forms: the module docstring)."""
    out = []
    for i, item in enumerate(data):
        item = pair(item, split, i)
        row = {"text": item["text"]}
        if names is not None:
            row["label"] = class_index(item.get("label"), names, split, i)
        out.append(row)
    if not out:
        raise ValueError(f"d2dmoe.convert: the {split} data is empty")
    return out


def pair(item, split: str, i: int) -> dict:
    """One item as {"text", "label"?}: a text, a (text, label) pair, or a dict (a Dataset's row)."""
    if isinstance(item, str):
        item = {"text": item}
    elif isinstance(item, (tuple, list)):
        item = dict(zip(("text", "label"), item))
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise TypeError(f"d2dmoe.convert: {split} item {i} is {item!r:.80}; give texts, (text, label) pairs or "
                        "dicts with a 'text' (and 'label') key")
    return item


def class_index(label, names: list[str], split: str, i: int) -> int:
    if isinstance(label, str) and label in names:
        return names.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return label
    raise ValueError(f"d2dmoe.convert: {split} item {i} has label {label!r}; the model's classes are "
                     f"{names} (give an index or one of these names)")


def write_data(splits: dict, names: list[str] | None, parent: Path) -> Path:
    def write(folder: Path) -> None:
        for split, data in splits.items():
            if data is not None:
                lines = (json.dumps(row, ensure_ascii=False) for row in rows(data, names, split))
                (folder / SPLIT_FILES[split]).write_text("\n".join(lines) + "\n")

    return content_folder(parent, "data", write)
