"""Image-classification data: batches of {"pixel_values": [B, C, H, W], "labels": [B]}.

Three kinds of source:
- `idx`: a folder of MNIST-style idx files (`train-images-idx3-ubyte.gz`, `t10k-...`): Fashion-MNIST
  from Debian's `dataset-fashion-mnist`. Test = the t10k files; validation is cut from train.
- `image_folder`: an ImageNet-style folder with `train/` and `val/` (one subfolder per class), read
  by torchvision's ImageFolder; test = `val/`, validation is cut from train.
- `digits`: scikit-learn's bundled 8x8 digits, split train/validation/test (for unit tests).
Every cut uses a fixed seed. With `dedup` (the default) identical images are removed first
(d2dmoe.dedup): the test images stay whole, and no image is in two splits.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import dedup as dd
from .data import LengthGroupedBatches, SplitData, require_local

KINDS = ("idx", "image_folder", "digits")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped): big-endian header of magic and sizes, then uint8 data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(folder: Path, prefix: str, kind: str) -> Path:
    found = sorted(folder.glob(f"{prefix}-{kind}-idx*"))
    if not found:
        raise FileNotFoundError(f"data.path={folder}: no {prefix}-{kind}-idx* file "
                                "(Fashion-MNIST: apt-get install dataset-fashion-mnist)")
    return found[0]


class TensorImages(Dataset):
    """Images [N, H, W] or [N, C, H, W] in [0, 1] with labels, normalised per channel."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        self.images = images if images.dim() == 4 else images.unsqueeze(1)  # [N, C, H, W]
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": (self.images[i].float() - self.mean) / self.std, "labels": int(self.labels[i])}


class FolderImages(Dataset):
    def __init__(self, folder: Path, image_size: int, mean, std, train: bool):
        from torchvision import datasets, transforms

        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()] if train else \
            [transforms.Resize(int(image_size / 0.875)), transforms.CenterCrop(image_size)]
        self.data = datasets.ImageFolder(str(folder), transforms.Compose(
            steps + [transforms.ToTensor(), transforms.Normalize(mean, std)]))
        self.classes = self.data.classes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        image, label = self.data[i]
        return {"pixel_values": image, "labels": label}


class ImageClassificationData(SplitData):
    def __init__(self, name: str, kind: str, path: str | None = None, image_size: int = 224,
                 mean: list[float] = (0.5,), std: list[float] = (0.5,), batch_size: int = 64,
                 eval_batch_size: int = 256, split_seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, limit_train: int | None = None, limit_eval: int | None = None,
                 num_workers: int = 0, cache_dir: str | None = None, dedup: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data.kind={kind!r}; allowed: {list(KINDS)}")
        self.name, self.kind, self.path = name, kind, path
        self.image_size, self.mean, self.std = image_size, list(mean), list(std)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.split_seed, self.val_fraction, self.test_fraction = split_seed, val_fraction, test_fraction
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.dedup = dedup
        self.removed: dict | None = None  # what dedup removed (d2dmoe.dedup.report), once the data is read
        self.tokenizer = None  # images need none
        self.splits: dict[str, Dataset] | None = None
        self.label_names: list[str] | None = None

    def train_texts(self) -> list[str]:
        raise TypeError(f"data {self.name} holds images: a tokenizer cannot be trained on it")

    def _cut(self, n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded random cut of range(n): (kept, cut off)."""
        order = torch.randperm(n, generator=generator)
        k = int(round(fraction * n))
        return order[k:], order[:k]

    def _distinct(self, keys: dict[str, list[str]]) -> dict[str, torch.Tensor]:
        """split -> indices kept (d2dmoe.dedup.disjoint; every index without dedup), and the count logged."""
        if not self.dedup:
            return {s: torch.arange(len(k)) for s, k in keys.items()}
        keep = dd.disjoint(keys)
        self.removed = dd.report(self.name, {s: len(k) for s, k in keys.items()}, {s: len(i) for s, i in keep.items()})
        return {s: torch.tensor(i, dtype=torch.long) for s, i in keep.items()}

    def _load(self) -> dict[str, Dataset]:
        g = torch.Generator().manual_seed(self.split_seed)
        if self.kind != "digits":
            require_local(self.path, "folder")
        if self.kind == "idx":
            folder = Path(self.path)
            load = lambda prefix, what: read_idx(find_idx(folder, prefix, what))  # noqa: E731
            raw, raw_test = load("train", "images"), load("t10k", "images")
            keep = self._distinct({"test": [dd.bytes_key(a.tobytes()) for a in raw_test],
                                   "train": [dd.bytes_key(a.tobytes()) for a in raw]})
            x = torch.from_numpy(raw.copy()).float()[keep["train"]] / 255
            y = torch.from_numpy(load("train", "labels").copy()).long()[keep["train"]]
            x_test = torch.from_numpy(raw_test.copy()).float()[keep["test"]] / 255
            y_test = torch.from_numpy(load("t10k", "labels").copy()).long()[keep["test"]]
            train, val = self._cut(len(y), self.val_fraction, g)
            self.label_names = [str(i) for i in range(int(y.max()) + 1)]
            return {"train": TensorImages(x[train], y[train], self.mean, self.std),
                    "validation": TensorImages(x[val], y[val], self.mean, self.std),
                    "test": TensorImages(x_test, y_test, self.mean, self.std)}
        if self.kind == "digits":
            from sklearn.datasets import load_digits

            digits = load_digits()
            one = self._distinct({"all": [dd.bytes_key(a.tobytes()) for a in digits.images]})["all"]
            x = torch.tensor(digits.images, dtype=torch.float32)[one] / 16  # [N, 8, 8]
            y = torch.tensor(digits.target, dtype=torch.long)[one]
            rest, test = self._cut(len(y), self.test_fraction, g)
            keep, val = self._cut(len(rest), self.val_fraction / (1 - self.test_fraction), g)
            train, val = rest[keep], rest[val]
            self.label_names = [str(c) for c in digits.target_names]
            return {s: TensorImages(x[i], y[i], self.mean, self.std)
                    for s, i in (("train", train), ("validation", val), ("test", test))}
        root = Path(self.path)
        train_all = FolderImages(root / "train", self.image_size, self.mean, self.std, train=True)
        plain = FolderImages(root / "train", self.image_size, self.mean, self.std, train=False)
        test = FolderImages(root / "val", self.image_size, self.mean, self.std, train=False)
        # every file read once to compare bytes: for ImageNet-sized folders this takes a while
        files = lambda d: [dd.bytes_key(Path(p).read_bytes()) for p, _ in d.data.samples]  # noqa: E731
        keep = self._distinct({"test": files(test), "train": files(train_all)})
        pool = keep["train"]
        train, val = self._cut(len(pool), self.val_fraction, g)
        self.label_names = train_all.classes
        return {"train": Subset(train_all, pool[train].tolist()), "validation": Subset(plain, pool[val].tolist()),
                "test": Subset(test, keep["test"].tolist())}

    def setup(self, stage: str | None = None):
        if self.splits is not None:
            return
        splits = self._load()
        limits = {"train": self.limit_train, "validation": self.limit_eval, "test": self.limit_eval}
        self.splits = {s: Subset(d, range(min(limits[s], len(d)))) if limits[s] else d for s, d in splits.items()}

    def prepare_data(self):
        pass

    @property
    def num_labels(self) -> int:
        self.setup()
        return len(self.label_names)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        # images are all one length: the batches are plain shuffled batches, resumable mid-epoch
        batches = LengthGroupedBatches([0] * len(self.splits[split]), batch_size, shuffle, seed=self.order_seed(shuffle))
        return DataLoader(self.splits[split], batch_sampler=batches, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.split_seed))
