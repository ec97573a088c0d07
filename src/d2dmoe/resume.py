"""Resuming a training phase killed part-way: Lightning checkpoints every `checkpoint_every` steps
into `<artifacts_dir>/.work/<artifact key>/last.ckpt` (written beside it under a temporary name and
renamed over it, AtomicCheckpointIO, so a kill mid-write leaves the previous checkpoint whole), holding the weights, optimizer, schedule and loop state, where training is in the data
(`SplitData.state_dict`) and torch's random state (`RngState`). The same command started again
continues from there, to the same result; the folder goes once the phase's artifact is saved. A
checkpoint that cannot be read (cut short by a full disk, written over, or holding a pickle that
`weights_only` refuses) is moved to `<artifacts_dir>/.stale/` with a warning naming it, and the
phase starts again."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

LAST = "last.ckpt"
log = logging.getLogger(__name__)


class RngState(Callback):
    """Torch's random state in each checkpoint and back: dropout after a resume draws what it would have."""

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in their own folder, flushed, then renamed over the
    last one. Lightning's own write goes through the system's temporary folder and a copy, which a
    kill can cut short on another filesystem, losing the previous checkpoint with it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def resume_callbacks(work_dir: Path, every: int) -> list[Callback]:
    """What a phase's Trainer needs to be resumable; nothing when `every` is 0 (checkpoints off)."""
    if not every:
        return []
    return [RngState(), ModelCheckpoint(dirpath=work_dir, filename=Path(LAST).stem, every_n_train_steps=every,
                                        save_top_k=1, enable_version_counter=False)]


def last_checkpoint(work_dir: Path) -> str | None:
    """The checkpoint to resume from, read once to check it (tensors memory-mapped, no code
    unpickled); None when there is none, or when it was unreadable and has been moved aside."""
    path = work_dir / LAST
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated zip, bytes written over it, a pickle weights_only refuses
        aside = work_dir.parent.parent / ".stale" / f"{work_dir.name}-{LAST}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        aside.parent.mkdir(parents=True, exist_ok=True)  # <artifacts_dir>/.stale, beside the artifacts set aside
        os.replace(path, aside)
        log.warning("%s cannot be read (%s: %s): moved to %s; the phase starts again from its beginning", path,
                    type(err).__name__, " ".join(str(err).split())[:200], aside)
        return None
    return str(path)
