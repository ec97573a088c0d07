"""Where a phase's output lives: `<root>/<phase>-<hash>/`, the hash taken over exactly the config
the phase depends on (its own settings plus its upstream phase's key). Writes are atomic: the
directory is filled under a temporary name and renamed into place, so a reader never sees half of it.
Jobs that need the same missing artifact at once (a joblib or SLURM sweep) take turns through a lock
file: one makes it, the others wait and load it.

Names come from configs, not from weights, so an artifact also records which upstream artifacts it
was made from (`lineage.json`: its own id and theirs). One whose upstream on disk has been made
again since (a deleted dense model retrained, say) is stale: it is set aside under `.stale/` and
made again, never silently combined with the new upstream.

Each artifact also records the SHA-256 of its files (`checksums.json`). One whose files no longer
match, whose JSON cannot be read, or whose weights cannot be loaded is set aside the same way and
made again, with a warning naming the file: bytes written over the weights never reach a result.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import logging
from collections.abc import Callable

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_model, save_model

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
SPEC = "spec.json"
INFO = "info.json"
LINEAGE = "lineage.json"
CHECKSUMS = "checksums.json"
CHECKED = (WEIGHTS, SPEC, INFO, LINEAGE)  # the files checksums.json covers


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical(value):
    """Whole floats as ints: `alpha=0` on the command line and `alpha: 0.0` in a file name one artifact."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def config_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(canonical(spec), sort_keys=True, default=str).encode()).hexdigest()[:12]


class CorruptArtifact(RuntimeError):
    pass


class Artifact:
    def __init__(self, root: str | Path, phase: str, spec: dict, upstream: Artifact | None = None):
        """upstream: the artifact this phase starts from; its key joins the spec (and so the hash)."""
        self.phase, self.upstream = phase, upstream
        self.spec = spec if upstream is None else {**spec, "upstream": upstream.key}
        self.key = f"{phase}-{config_key(self.spec)}"
        self.dir = Path(root) / self.key

    def exists(self) -> bool:
        return (self.dir / WEIGHTS).is_file()

    def ancestors(self) -> list[Artifact]:
        """Upstream, its upstream, ... up to the dense model."""
        chain, art = [], self.upstream
        while art is not None:
            chain.append(art)
            art = art.upstream
        return chain

    def lineage(self) -> dict:
        """{"id": this artifact's, "made_from": {ancestor key: its id then}}; empty for one saved before
        lineage was recorded, or whose lineage cannot be read (corruption() says so)."""
        path = self.dir / LINEAGE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def corruption(self) -> str | None:
        """What is wrong with the saved files, or None: a file that differs from its checksum, a JSON
        file that cannot be read. Artifacts saved before checksums were recorded get the JSON check."""
        sums = self.dir / CHECKSUMS
        try:
            for name in (SPEC, INFO, LINEAGE, *([CHECKSUMS] if sums.is_file() else [])):
                if (self.dir / name).is_file():
                    json.loads((self.dir / name).read_text())
            expected = json.loads(sums.read_text()) if sums.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"{self.dir / name} cannot be read ({err})"
        for name, digest in expected.items():
            path = self.dir / name
            if not path.is_file() or sha256(path) != digest:
                return f"{path} is not the file that was saved (its SHA-256 differs)"
        return None

    def stale_reason(self) -> str | None:
        """Why the saved artifact cannot come from the ancestors now on disk, or None. An ancestor
        missing from disk, or itself saved without an id, cannot be checked and passes."""
        made_from = self.lineage().get("made_from", {})
        for art in self.ancestors():
            now = art.lineage().get("id") if art.exists() else None
            if now is not None and now != made_from.get(art.key):
                return f"{art.dir} was made again after it"
        return None

    def set_aside(self, reason: str) -> None:
        dest = self.dir.parent / ".stale" / f"{self.key}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.dir, dest)
        log.warning("%s cannot be used (%s): moved to %s, making it again", self.dir, reason, dest)

    @property
    def work_dir(self) -> Path:
        """Where the phase keeps its checkpoints while it trains (resume.py); removed once saved."""
        return self.dir.parent / ".work" / self.key

    def save(self, model: torch.nn.Module, info: dict | None = None) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.with_name(f".tmp-{self.key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / WEIGHTS))
        (tmp / SPEC).write_text(json.dumps(self.spec, indent=2, sort_keys=True, default=str))
        (tmp / INFO).write_text(json.dumps(info or {}, indent=2))
        made_from = {art.key: art.lineage().get("id") for art in self.ancestors() if art.exists()}
        (tmp / LINEAGE).write_text(json.dumps({"id": uuid.uuid4().hex, "made_from": made_from}, indent=2))
        (tmp / CHECKSUMS).write_text(json.dumps({name: sha256(tmp / name) for name in CHECKED}, indent=2))
        try:
            os.rename(tmp, self.dir)
        except OSError:  # another job wrote the same artifact first; both are equal, keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            load_model(model, str(self.dir / WEIGHTS))
        except Exception as err:  # truncated file, or weights of another shape than the config gives
            raise CorruptArtifact(f"{self.dir}: cannot be loaded into the model this config builds "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from err
        return model

    def obtain(self, load: Callable[[], torch.nn.Module],
               make: Callable[[], tuple[torch.nn.Module, dict]]) -> torch.nn.Module:
        """`load()` if the artifact exists; otherwise, holding its lock, `make()` -> (model, info), saved.
        A job that finds the lock taken waits, then loads what the holder saved. Locks are taken
        downstream first (routers, then split, ...), always in that order: no deadlock. A stale
        artifact (see `stale_reason`) is set aside, under the lock, and made again."""
        if self.exists() and self.corruption() is None and self.stale_reason() is None:
            log.info("reusing %s", self.dir)
            try:
                return load()
            except CorruptArtifact:  # weights that no longer load: set aside and made again below
                pass
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.dir.with_name(f".{self.key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for %s: another job is making it", self.dir)
            lock.acquire()
        try:
            if self.exists():
                reason = self.corruption() or self.stale_reason()
                if reason is None:  # made by the job we waited for
                    log.info("reusing %s", self.dir)
                    try:
                        return load()
                    except CorruptArtifact as err:
                        reason = str(err)
                self.set_aside(reason)
            model, info = make()
            self.save(model, info)
            return model
        finally:
            lock.release()
