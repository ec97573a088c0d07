"""Duplicates removed before any number is measured, so that no item is in two splits.

Items are compared by a key: texts by their normalised form (Unicode NFKC, case folded, every run of
punctuation and whitespace one space: copies that differ in spacing, case or punctuation are one
text), images by their bytes. Two rules, one per kind of source:

- one pool cut into splits (`first_of_each`): keep each key's first item, then cut.
- splits given by the source (`disjoint`): the reporting split (test) stays whole; validation loses
  the items also in test, train those in test or validation, and each split its own repeats. The
  copies leave the splits that train and choose, never the one that reports.
"""
from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

PRIORITY = ("test", "validation", "train")  # a key in an earlier split leaves the later ones


def text_key(text: str) -> str:
    """A text's key: two texts with the same normalised form get the same key."""
    words = re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text or "").casefold()).split()
    return hashlib.sha1(" ".join(words).encode()).hexdigest()


def bytes_key(data: bytes) -> str:
    """An image's (or any blob's) key: identical bytes, identical key."""
    return hashlib.sha1(data).hexdigest()


def first_of_each(keys: Iterable[str]) -> list[int]:
    """Indices of the first item of every key, in order."""
    seen, keep = set(), []
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def disjoint(keys: dict[str, Sequence[str]]) -> dict[str, list[int]]:
    """split -> indices kept: each key once, in the first split of PRIORITY that has it (splits not in
    PRIORITY come after, in the given order)."""
    order = [s for s in PRIORITY if s in keys] + [s for s in keys if s not in PRIORITY]
    seen: set[str] = set()
    kept = {}
    for split in order:
        kept[split] = [i for i in first_of_each(keys[split]) if keys[split][i] not in seen]
        seen.update(keys[split][i] for i in kept[split])
    return {s: kept[s] for s in keys}


def report(name: str, before: dict[str, int] | int, after: dict[str, int] | int) -> dict:
    """Log and return what was removed: {"removed": total, "per_split": {split: removed}} (one pool:
    per_split is empty)."""
    if isinstance(before, int):
        out = {"removed": before - after, "per_split": {}}
    else:
        per = {s: before[s] - after[s] for s in before}
        out = {"removed": sum(per.values()), "per_split": per}
    if out["removed"]:
        where = ", ".join(f"{n} from {s}" for s, n in out["per_split"].items() if n) or "before splitting"
        log.warning("data %s: %d duplicate items removed (%s), so that no item is in two splits",
                    name, out["removed"], where)
    return out
